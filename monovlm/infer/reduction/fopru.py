"""FoPru-style focal pruning with two strategies over visual-only received attention (causal-normalised):

- "rank": keep each image's top-k patches (a global top-k over the image);
- "row": keep whole grid rows, those with the highest mean score, round(k / cols) of them (at least 1), which keeps
  local continuity (and each kept row's separator token, which is structural and always kept anyway).
Kept tokens stay in their original order. FoPru scores inside the vision encoder; here the score comes from a shallow
decoder layer (`layer`, default 2), the re-homing recommended for encoder-free models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext, top_k_positions

STRATEGIES = ("rank", "row")


@dataclass
class FoPru(OneLayerMethod):
    name = "fopru"
    layer: int = 2
    strategy: str = "rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"fopru: strategy={self.strategy!r} is not one of {STRATEGIES}")

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        choices = []
        for image in ctx.images:
            scores, k = ctx.received_attention(image), image.budget(self.keep)
            if self.strategy == "rank":
                choices.append(ImageChoice(image.index, top_k_positions(image, scores, k)))
                continue
            rows_present = image.grid_row.unique()  # sorted
            row_of = torch.searchsorted(rows_present, image.grid_row)
            row_scores = torch.zeros(rows_present.numel(), device=scores.device).index_add_(0, row_of, scores)
            row_scores /= torch.bincount(row_of, minlength=rows_present.numel())
            num_rows = min(rows_present.numel(), max(1, math.floor(k / image.cols + 0.5)))
            kept_rows = rows_present[row_scores.topk(num_rows).indices]
            choices.append(ImageChoice(image.index, image.patches[torch.isin(image.grid_row, kept_rows)]))
        return choices
