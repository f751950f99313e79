"""Conversation turns + images -> the token ids the model answers from (the server's and the terminal chat's prompt).

The ids come from `Processor.encode_chat`, the builder training and evaluation use, so a conversation asked over HTTP
or in `monovlm chat` reads exactly as the training code writes it (system turn included). What is added here is what
a chat client may get wrong: the conversation must end with the user's turn, and text that spells one of the model's
special tokens (e.g. "<|im_start|>") is refused with an error naming the token — it would otherwise be encoded *as*
that token, and a user could forge turns or image placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from monovlm.data.processor import Processor, SampleError, Turn


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

    `turns` end with the user's; each IMAGE_MARKER in a turn's text takes the next image. A system turn replaces the
    model's configured system prompt. Raises PromptError."""
    if not turns or turns[-1].role != "user":
        raise PromptError("the conversation must end with a user turn")
    reserved = reserved_tokens(processor)
    for index, turn in enumerate(turns):
        check_turn_text(turn.text, reserved, f"messages[{index}]")
    try:
        encoded = processor.encode_chat(turns, images, add_generation_prompt=True)
    except SampleError as error:  # e.g. image markers and images disagree: the client's conversation, not a bug
        raise PromptError(str(error)) from error
    image_ids = {processor.image_id, processor.image_start_id, processor.image_end_id}
    return Prompt(encoded.input_ids, encoded.images, sum(token in image_ids for token in encoded.input_ids))
