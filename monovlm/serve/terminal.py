"""The terminal chat behind `monovlm chat`: a conversation with history, images attached to the next question, and
answers streamed as they are decoded.

    ChatSession.attach(path)    the next question is about this image (loaded now by the safe loader)
    ChatSession.ask(question)   yields the answer's text pieces; the turn joins the history when the answer is done
    ChatSession.reset()         forget the conversation
    run_repl(session, lines)    read questions and /commands from lines (stdin): /image PATH, /reset, /quit

Prompts are built by `prompt.chat_prompt`, the server's builder, so a conversation reads the same over HTTP and here.
A session's `methods` (token reduction, decoding strategy: `methods.InferenceMethods`, the server's `"monovlm"`
request field) apply to every question of a conversation that holds an image; a text-only one is answered plainly,
since both act on images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TextIO

from PIL import Image

from monovlm.data.images import ImageLoadError
from monovlm.data.processor import IMAGE_MARKER, Processor, SampleError
from monovlm.infer.generate import GenerationConfig, stream_text
from monovlm.serve.messages import Turn
from monovlm.serve.methods import InferenceMethods
from monovlm.serve.prompt import PromptError, chat_prompt

HELP = "commands: /image PATH (attach an image to the next question), /reset (forget the conversation), /quit"


class ChatSession:
    def __init__(self, model, processor: Processor, config: GenerationConfig,
                 methods: InferenceMethods | None = None) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.methods = methods or InferenceMethods()
        self.methods.check_model(model.config.decoder.num_layers)  # MethodError (a ValueError) before any question
        self.turns: list[Turn] = []
        self.images: list[Image.Image] = []  # the images of the turns in `turns`, in order
        self.pending: list[Image.Image] = []  # attached, for the next question

    @property
    def context(self) -> int:
        return self.model.config.decoder.max_position_embeddings

    def attach(self, path: str | os.PathLike) -> None:
        """Load an image for the next question; raises ImageLoadError (naming the file and the reason)."""
        self.pending.append(self.processor.load(path))

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    def ask(self, question: str) -> Iterator[str]:
        """Yield the answer's text as it is decoded; the question and answer join the history at the end.

        Raises PromptError before generating when the conversation cannot be a prompt (e.g. it outgrew the context).
        Pending images go before the question unless it places them with <image> markers (as Processor.prompt)."""
        text = question
        if self.pending and IMAGE_MARKER not in text:
            text = IMAGE_MARKER * len(self.pending) + ("\n" + text if text else "")
        turn = Turn("user", text)
        images = self.images + self.pending
        try:
            prompt = chat_prompt(self.processor, [*self.turns, turn], images)
        except SampleError as error:
            raise PromptError(str(error)) from error
        room = self.context - len(prompt.ids)
        if room < self.config.max_new_tokens:
            raise PromptError(f"the conversation is {len(prompt.ids)} tokens; with max_new_tokens="
                              f"{self.config.max_new_tokens} it would pass the model's context of {self.context} "
                              "tokens. /reset to start over")
        tokenizer = self.processor.tokenizer
        pieces = []
        strategy = self.methods.build_strategy() if prompt.images else None  # fresh per answer, as the server's
        for deltas in stream_text(self.model, [prompt.ids], tokenizer, self.config, pad_id=tokenizer.pad_id or 0,
                                  prefill_inputs=self.methods.prefill_inputs(prompt.images), strategy=strategy):
            pieces.append(deltas[0])
            yield deltas[0]
        # an answer that spells the image marker must not claim an image slot when the history is re-read
        answer = "".join(pieces).replace(IMAGE_MARKER, "<image >")
        self.turns += [turn, Turn("assistant", answer)]
        self.images, self.pending = images, []


def run_repl(session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO, prompt: str = "") -> None:
    """Answer each line of `lines` (until /quit or the end of input), writing answers to `out` as they stream and
    errors to `err`; a bad line never ends the session."""
    out.write(prompt)
    out.flush()
    for line in lines:
        line = line.strip()
        command, _, argument = line.partition(" ")
        if not line:
            pass
        elif command in ("/quit", "/exit"):
            return
        elif command == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
        elif command == "/image":
            path = argument.strip()
            if not path:
                err.write("error: /image needs a path, e.g. /image photo.png\n")
            else:
                try:
                    session.attach(os.path.expanduser(path))
                    err.write(f"(image {path} attached to the next question)\n")
                except ImageLoadError as error:
                    err.write(f"error: {error}\n")
        elif command in ("/help", "/?"):
            err.write(HELP + "\n")
        elif command.startswith("/"):
            err.write(f"error: unknown command {command}; {HELP}\n")
        else:
            try:
                for piece in session.ask(line):
                    out.write(piece)
                    out.flush()
                out.write("\n")
            except PromptError as error:
                err.write(f"error: {error}\n")
        out.write(prompt)
        out.flush()
