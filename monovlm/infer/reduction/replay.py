"""Replay the decisions of an earlier forward (its `Trace`): the same tokens kept and merged, at the same layers.

This is how to run a full, uncached forward over prompt + generated tokens "with the same reduction decisions" as a
cached generation (the scorers themselves would see the generated tokens and may decide differently), and a way to
apply one prompt's selection again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monovlm.infer.reduction.apply import Trace
from monovlm.infer.reduction.base import ImageChoice, Method, ReductionContext


@dataclass
class Replay(Method):
    name = "replay"
    trace: Trace = None

    def __post_init__(self) -> None:
        if not isinstance(self.trace, Trace):
            raise TypeError("replay needs the Trace of an earlier forward (Reduction.last_trace)")

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        if num_layers != self.trace.num_layers:
            raise ValueError(f"replay: the trace is of a {self.trace.num_layers}-layer model, this has {num_layers}")
        return tuple(stage.layer for stage in self.trace.stages)

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        stage = next(stage for stage in self.trace.stages if stage.layer == ctx.layer)
        rows = {image.index: image.row for image in ctx.images}
        choices = []
        for choice in stage.choices:
            if choice.image not in rows:
                raise ValueError(f"replay: image {choice.image} of the trace has no patches in this forward")
            original = ctx.tokens.original_index[rows[choice.image]]  # ascending over the real tokens
            sources = _positions(original, choice.sources, choice.image) if choice.sources is not None else None
            choices.append(ImageChoice(choice.image, _positions(original, choice.keep, choice.image), sources,
                                       choice.mix))
        return choices


def _positions(original: torch.Tensor, indices: torch.Tensor, image: int) -> torch.Tensor:
    """Current positions of the tokens with these original indices (all of which must still be present)."""
    where = torch.searchsorted(original, indices).clamp(max=original.numel() - 1)
    if not torch.equal(original[where], indices):
        raise ValueError(f"replay: tokens of image {image} chosen in the trace are not present in this forward")
    return where
