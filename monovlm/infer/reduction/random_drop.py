"""Random baseline: keep a uniformly random subset of each image's patches (seeded, so a run is repeatable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext


@dataclass
class RandomDrop(OneLayerMethod):
    name = "random"
    seed: int = 0

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        generator = torch.Generator().manual_seed(self.seed)  # CPU generator: the same picks on every device
        choices = []
        for image in ctx.images:
            picked = torch.randperm(image.patches.numel(), generator=generator)[: image.budget(self.keep)]
            choices.append(ImageChoice(image.index, image.patches[picked.sort().values.to(image.patches.device)]))
        return choices
