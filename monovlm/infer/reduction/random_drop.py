"""Random baseline: keep a uniformly random subset of each image's patches (seeded, so a run is repeatable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, Method, ReductionContext, check_keep, check_layer


@dataclass
class RandomDrop(Method):
    name = "random"
    keep: float = 0.25
    layer: int = 0  # 0 = before the decoder
    seed: int = 0

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        check_layer(self.layer, num_layers, self.name)
        return (self.layer,)

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        generator = torch.Generator().manual_seed(self.seed)  # CPU generator: the same picks on every device
        choices = []
        for image in ctx.images:
            picked = torch.randperm(image.patches.numel(), generator=generator)[: image.budget(self.keep)]
            choices.append(ImageChoice(image.index, image.patches[picked.sort().values.to(image.patches.device)]))
        return choices
