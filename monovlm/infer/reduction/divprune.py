"""DivPrune: keep a maximally diverse subset of each image's patches (max-min diversity, solved greedily).

Distances are 1 - cosine similarity of the hidden states at `layer` (0 = the image embeddings, before the decoder).
The first pick is the patch whose nearest neighbour is farthest; each next pick is the patch farthest from everything
picked so far (farthest-point sampling). Attention-free and text-agnostic. In an encoder-free model the layer-0
embeddings are close to pixels, so diversity there is pixel diversity; `layer=2` scores after a few layers instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity over features (n, C) in cosine distance: k indices, in pick order."""
    normed = F.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.T  # (n, n)
    n = distance.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf")).min(dim=1)
    picked = [int(nearest.values.argmax())]
    closest = distance[picked[0]].clone()  # (n,) distance of each patch to the picked set
    closest[picked[0]] = float("-inf")  # picked patches stay at -inf: the minimum below never lifts them
    for _ in range(k - 1):
        picked.append(int(closest.argmax()))
        closest = torch.minimum(closest, distance[picked[-1]])
        closest[picked[-1]] = float("-inf")
    return torch.tensor(picked, dtype=torch.long, device=features.device)


@dataclass
class DivPrune(OneLayerMethod):
    name = "divprune"
    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        choices = []
        for image in ctx.images:
            k = min(image.budget(self.keep), image.patches.numel())
            picked = max_min_diverse(ctx.hidden[image.row, image.patches], k)
            choices.append(ImageChoice(image.index, image.patches[picked.sort().values]))
        return choices
