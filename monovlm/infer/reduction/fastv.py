"""FastV ("An Image is Worth 1/2 Tokens After Layer 2"): rank each image's patches by the attention the prompt's
last token pays them in layer K-1 (averaged over heads) and keep the top ones from layer K on.

Layers 0..K-1 run at full length (and keep the full prompt in the KV cache); the pruned set is fixed at prefill and
holds through decoding, as FastV does with a cache. The attention row is recomputed from layer K-1's own q/k for the
one query, instead of running the layer eagerly a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

from monovlm.infer.reduction.base import ImageChoice, Method, ReductionContext, check_keep, check_layer, top_k_positions


@dataclass
class FastV(Method):
    name = "fastv"
    keep: float = 0.5
    layer: int = 2  # K: the first layer that sees the reduced sequence (the paper's K=2, R=50%)

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.layer < 1:
            raise ValueError(f"fastv: layer={self.layer} must be >= 1 (its scores come from layer K-1's attention)")

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        check_layer(self.layer, num_layers, self.name)
        return (self.layer - 1, self.layer)

    def select(self, ctx: ReductionContext) -> list[ImageChoice] | None:
        if ctx.layer == self.layer - 1:  # score with this layer's attention, drop before the next
            for image in ctx.images:
                ctx.remember(self.name, image, ctx.last_token_attention(image))
            return None
        return [ImageChoice(image.index, top_k_positions(image, ctx.recall(self.name, image),
                                                         image.budget(self.keep)))
                for image in ctx.images]
