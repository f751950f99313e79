"""HiPrune-style selection from two depths: anchors, their spatial buffers, and registers.

Scores are visual-only received attention (causal-normalised, see `ReductionContext.received_attention`) — the
decoder-only stand-in for HiPrune's mean attention inside the vision encoder. With budget k per image:
1. anchors: the top round(k·alpha/5) patches by the scores of the shallower `anchor_layer` (object layer);
2. buffers: the 4-neighbours (up, down, left, right on the true grid, no wrap across rows) of each anchor;
3. registers: the rest of the budget, top patches by the scores of the deeper `layer`, where the drop happens.
Layers before `layer` run at full length — accounting reports that honestly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, ImageView, Method, ReductionContext, check_keep, check_layer


def grid_neighbours(image: ImageView, chosen: torch.Tensor) -> torch.Tensor:
    """Indices (into the image's patches) of the present 4-neighbours of the chosen patches, in order of the chosen."""
    index_of = {(r, c): i for i, (r, c) in enumerate(zip(image.grid_row.tolist(), image.grid_col.tolist()))}
    found = []
    for i in chosen.tolist():
        r, c = int(image.grid_row[i]), int(image.grid_col[i])
        for neighbour in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if neighbour in index_of:
                found.append(index_of[neighbour])
    return torch.tensor(found, dtype=torch.long, device=chosen.device)


@dataclass
class HiPrune(Method):
    name = "hiprune"
    keep: float = 0.25
    anchor_layer: int = 1  # the "object layer": anchors and buffers
    layer: int = 2  # registers, and the drop
    alpha: float = 0.1  # share of the budget spent on anchors + buffers (5 tokens per anchor)

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if not 0 <= self.anchor_layer <= self.layer:
            raise ValueError(f"hiprune: anchor_layer={self.anchor_layer} must be in [0, layer={self.layer}]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hiprune: alpha={self.alpha} must be in [0, 1]")

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        check_layer(self.layer, num_layers, self.name)
        return tuple(sorted({self.anchor_layer, self.layer}))

    def select(self, ctx: ReductionContext) -> list[ImageChoice] | None:
        if ctx.layer == self.anchor_layer:
            for image in ctx.images:
                ctx.remember(self.name, image, ctx.received_attention(image))
        if ctx.layer != self.layer:
            return None
        choices = []
        for image in ctx.images:
            k = image.budget(self.keep)
            anchor_scores = ctx.recall(self.name, image)
            register_scores = ctx.received_attention(image)
            num_anchors = min(k, max(1, math.floor(k * self.alpha / 5 + 0.5))) if self.alpha > 0 else 0
            anchors = anchor_scores.topk(num_anchors).indices
            ordered = torch.cat([anchors, grid_neighbours(image, anchors)]).tolist()  # priority order
            first_seen = list(dict.fromkeys(ordered))  # deduplicated, order kept
            chosen = torch.tensor(first_seen[:k], dtype=torch.long, device=anchors.device)
            available = register_scores.clone()
            available[chosen] = float("-inf")
            registers = available.topk(k - chosen.numel()).indices
            kept = torch.cat([chosen, registers]).sort().values
            choices.append(ImageChoice(image.index, image.patches[kept]))
        return choices
