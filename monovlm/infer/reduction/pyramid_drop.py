"""PyramidDrop: drop visual tokens in stages. Before each stage layer the last instruction token's attention in that
layer (recomputed from the layer's own input norm, q/k projections and RoPE, for that one query) ranks the patches,
and each image keeps ratio_s of its original patches from there on.

Defaults follow the paper: stages at [L/4, L/2, 3L/4] (8, 16, 24 of 32 layers) with ratios keep, keep², keep³
(0.5, 0.25, 0.125 for keep=0.5). PyramidDrop renumbers positions; here that is `positions="renumber"` on the
Reduction, and the default keeps the original positions as every method does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monovlm.infer.reduction.base import (
    ImageChoice,
    Method,
    ReductionContext,
    check_keep,
    check_layer,
    default_stage_layers,
    top_k_positions,
)


@dataclass
class StagedMethod(Method):
    """Shared by the progressive methods: stage layers and a keep ratio per stage."""

    keep: float = 0.5
    layers: Sequence[int] | None = None  # None -> [L/4, L/2, 3L/4]
    ratios: Sequence[float] | None = None  # None -> keep, keep², keep³, ...

    def __post_init__(self) -> None:
        check_keep(self.keep)
        for ratio in self.ratios or ():
            check_keep(ratio, "ratio")
        if self.layers is not None and self.ratios is not None and len(self.layers) != len(self.ratios):
            raise ValueError(f"{self.name}: {len(self.layers)} layers but {len(self.ratios)} ratios")
        if self.layers is not None and not self.layers:
            raise ValueError(f"{self.name}: layers=[] names no stage")

    def stages(self, num_layers: int) -> dict[int, float]:
        layers = tuple(self.layers) if self.layers is not None else default_stage_layers(num_layers)
        if not layers:
            raise ValueError(f"{self.name}: a {num_layers}-layer decoder has no default stage layers; pass layers=")
        if self.ratios is not None and len(self.ratios) != len(layers):
            raise ValueError(f"{self.name}: {len(self.ratios)} ratios for the {len(layers)} stages at layers "
                             f"{list(layers)}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{self.name}: stage layers {list(layers)} must be increasing")
        for layer in layers:
            check_layer(layer, num_layers, self.name, "stage layer")
        ratios = self.ratios if self.ratios is not None else [self.keep ** (s + 1) for s in range(len(layers))]
        return dict(zip(layers, ratios))

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.stages(num_layers))

    def ratio_at(self, ctx: ReductionContext) -> float:
        return self.stages(ctx.decoder.config.num_layers)[ctx.layer]


@dataclass
class PyramidDrop(StagedMethod):
    name = "pyramiddrop"

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        ratio = self.ratio_at(ctx)
        return [ImageChoice(image.index, top_k_positions(image, ctx.last_token_attention(image), image.budget(ratio)))
                for image in ctx.images]
