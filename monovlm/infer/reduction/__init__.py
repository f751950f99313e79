"""Training-free visual token reduction: one mechanism (`apply.py`), many scorers (one file each).

    from monovlm.infer.reduction import build_reduction
    reduction = build_reduction("fastv", keep=0.5, layer=2)
    logits = vlm(input_ids, images, reduction=reduction)                     # one forward
    generate(vlm, prompts, config, prefill_inputs={"images": images, "reduction": reduction})  # prefill + decode

The reduced forward walks the decoder's layers itself and keeps a KV cache per group of layers (`forward.py`); the
decoder knows nothing of it.

`keep` is the fraction of each image's droppable patch tokens kept (rounded half up, at least 1); text tokens and
structural visual tokens (CLS, row separators, image begin/end) are always kept. Progressive methods read `keep` as
their first stage's ratio (see `pyramid_drop.py`). `positions="original"` (default) or `"renumber"`.
"""

from __future__ import annotations

import dataclasses

from monovlm.infer.reduction.accounting import FlopsEstimate, Measurement, generation_flops, measure_generation
from monovlm.infer.reduction.apply import Trace
from monovlm.infer.reduction.base import ImageChoice, Method, ReductionContext
from monovlm.infer.reduction.divprune import DivPrune
from monovlm.infer.reduction.fastv import FastV
from monovlm.infer.reduction.fopru import FoPru
from monovlm.infer.reduction.forward import ReducedCache, Reduction
from monovlm.infer.reduction.fourier import Fourier
from monovlm.infer.reduction.hiprune import HiPrune
from monovlm.infer.reduction.pyramid_drop import PyramidDrop
from monovlm.infer.reduction.random_drop import RandomDrop
from monovlm.infer.reduction.replay import Replay
from monovlm.infer.reduction.tome import ToMe
from monovlm.infer.reduction.uniform_grid import UniformGrid
from monovlm.infer.reduction.vision_drop import VisionDrop

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (RandomDrop, UniformGrid, FastV, PyramidDrop, VisionDrop, HiPrune, FoPru, DivPrune, Fourier, ToMe)
}


def build_reduction(name: str, keep: float = 0.25, positions: str = "original", **options) -> Reduction:
    """A Reduction for method `name` (see METHODS) keeping `keep` of each image's patches; options go to the method
    (e.g. layer=2, layers=[1, 2], ratios=[...], strategy="row", seed=0)."""
    if name not in METHODS:
        raise ValueError(f"unknown token reduction method {name!r}; choose one of {sorted(METHODS)}")
    method_class = METHODS[name]
    known = {f.name for f in dataclasses.fields(method_class)} - {"keep"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; its options are {sorted(known)}")
    return Reduction(method_class(keep=keep, **options), positions)


def replay(trace: Trace, positions: str = "original") -> Reduction:
    """A Reduction that repeats the decisions recorded in `trace` (e.g. `reduction.last_trace`)."""
    return Reduction(Replay(trace=trace), positions)


__all__ = ["METHODS", "FlopsEstimate", "ImageChoice", "Measurement", "Method", "ReducedCache", "Reduction",
           "ReductionContext", "Trace", "build_reduction", "generation_flops", "measure_generation", "replay"]
