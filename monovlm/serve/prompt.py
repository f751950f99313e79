"""Conversation turns + images -> the token ids the model answers from (the server's and the terminal chat's prompt).

One user message goes through `Processor.prompt`, the path evaluation and the one-shot chat use, so a question asked
over HTTP reads exactly as in `monovlm chat` and the eval harness. A longer conversation is written the way
`Processor.process` writes a training conversation (chatml turns; images where their markers are) and then opens the
assistant's turn; tests check the two agree token for token.

Text that spells one of the model's special tokens (e.g. "<|im_start|>") would otherwise be encoded *as* that token —
a user could forge turns or image placeholders — so it is refused with an error naming the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from monovlm.data.processor import IMAGE_MARKER, Processor
from monovlm.serve.messages import Turn


class PromptError(ValueError):
    """A conversation that cannot become a prompt for this model; the message says which turn and why."""


@dataclass
class Prompt:
    ids: list[int]
    images: list[torch.Tensor]  # (3, H, W) each, in order of appearance
    image_tokens: int  # how many of `ids` are image placeholders (start/end markers included)


def reserved_tokens(processor: Processor) -> tuple[str, ...]:
    """The special-token strings of the model's tokenizer (text containing one is refused)."""
    added = processor.tokenizer.backend.get_added_tokens_decoder().values()
    return tuple(sorted({token.content for token in added if token.special}))


def check_turn_text(text: str, reserved: Sequence[str], where: str) -> None:
    for token in reserved:
        if token in text:
            raise PromptError(f"{where} contains {token!r}, a special token of the model's prompt format; text may not "
                              "spell special tokens (they would be read as structure, not as text)")


def chat_prompt(processor: Processor, turns: Sequence[Turn], images: Sequence[Image.Image]) -> Prompt:
    """Token ids ending where the model starts its answer, and the image tensors in order.

    `turns` end with the user's; each IMAGE_MARKER in a turn's text takes the next image. Raises PromptError."""
    if not turns or turns[-1].role != "user":
        raise PromptError("the conversation must end with a user turn")
    markers = sum(turn.text.count(IMAGE_MARKER) for turn in turns)
    if markers != len(images):
        raise PromptError(f"the conversation has {markers} image marker(s) ({IMAGE_MARKER}) for {len(images)} image(s)")
    reserved = reserved_tokens(processor)
    for index, turn in enumerate(turns):
        check_turn_text(turn.text, reserved, f"messages[{index}]")
    if len(turns) == 1:
        ids, tensors = processor.prompt(turns[0].text, list(images))
    elif processor.config.template == "plain":
        raise PromptError("this model uses the 'plain' (pre-training) template, which reads a single user message "
                          f"with its images, not a {len(turns)}-turn conversation")
    else:
        ids, tensors = _chatml_conversation(processor, turns, images)
    image_ids = {processor.image_id, processor.image_start_id, processor.image_end_id}
    return Prompt(ids, tensors, sum(token in image_ids for token in ids))


def _chatml_conversation(processor: Processor, turns: Sequence[Turn], images: Sequence[Image.Image]):
    """As Processor._chatml writes a training conversation (header, body, <|im_end|>, newline per turn), then the
    header of the assistant's answer."""
    tokenizer = processor.tokenizer
    if processor.config.system_prompt and not any(turn.role == "system" for turn in turns):
        turns = [Turn("system", processor.config.system_prompt), *turns]
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    tensors: list[torch.Tensor] = []
    pending = list(images)
    for turn in turns:
        ids += processor.im_start + tokenizer.encode(turn.role + "\n")
        for position, piece in enumerate(turn.text.split(IMAGE_MARKER)):
            if position > 0:
                block, tensor = processor.image_block(pending.pop(0))
                ids += block
                tensors.append(tensor)
            if piece:
                ids += tokenizer.encode(piece)
        ids += processor.im_end + newline
    ids += processor.im_start + tokenizer.encode("assistant\n")
    return ids, tensors
