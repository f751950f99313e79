"""The terminal chat behind `monovlm chat`: a conversation with history, images attached to the next question, and
answers streamed as they are decoded.

    ChatSession.attach(path)          the next question is about this image (loaded now by the safe loader)
    ChatSession.ask(question)         yields the answer's text pieces; the turn joins the history when it is done
    ChatSession.prompt_for(question)  the prompt `ask` answers from (token ids and image tensors)
    ChatSession.reset()               forget the conversation (the system message stays)
    run_repl(session, lines)          read questions and /commands from lines (stdin): /image PATH, /reset, /quit

Prompts are built by `prompt.chat_prompt`, the server's builder, so a conversation reads the same over HTTP and here;
a session's `system` message opens every conversation as an API request's system message does.
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
from monovlm.data.processor import IMAGE_MARKER, Processor, Turn, question_turn
from monovlm.infer.generate import GenerationConfig, stream_text
from monovlm.serve.methods import InferenceMethods
from monovlm.serve.prompt import Prompt, PromptError, chat_prompt, check_turn_text, reserved_tokens

HELP = "commands: /image PATH (attach an image to the next question), /reset (forget the conversation), /quit"


class ChatSession:
    def __init__(self, model, processor: Processor, config: GenerationConfig,
                 methods: InferenceMethods | None = None, system: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.methods = methods or InferenceMethods()
        # opens every conversation, in place of the model's configured system prompt (None: keep that one)
        self.system = [Turn("system", system)] if system is not None else []
        if system is not None:
            check_turn_text(system, reserved_tokens(processor), "the system message")  # PromptError before any question
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

    def prompt_for(self, question: str) -> Prompt:
        """The prompt `ask(question)` answers from: system message, history, question (about the pending images).
        Raises PromptError."""
        turn = question_turn(question, len(self.pending))
        return chat_prompt(self.processor, [*self.system, *self.turns, turn], self.images + self.pending)

    def ask(self, question: str) -> Iterator[str]:
        """Yield the answer's text as it is decoded; the question and answer join the history at the end.

        Raises PromptError before generating when the conversation cannot be a prompt (e.g. it outgrew the context)."""
        turn = question_turn(question, len(self.pending))
        prompt = self.prompt_for(question)
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
        self.images, self.pending = self.images + self.pending, []


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
