"""VisionDrop-style reduction: score patches by visual-only received attention (image queries -> image keys, with
causal normalisation), keep the dominant ones, and merge the dropped ones into a few contextual tokens.

Per stage (PyramidDrop's layers and ratio schedule) and image, with budget k: the top k - c patches by received
attention are dominant; c = round(contextual · k) contextual targets are spread evenly over the remaining patches;
every other remaining patch joins the target whose key (this layer's, head-averaged, before RoPE) is most similar in
cosine. A target becomes itself plus the mean of what joined it (`merge="add"`, VisionZip's rule), or the plain mean
of all of them (`merge="average"`). Text attention is never used, which sidesteps the causal/semantic misalignment
of text -> image attention that VisionDrop identifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monovlm.infer.reduction.base import ImageChoice, ImageView, ReductionContext
from monovlm.infer.reduction.pyramid_drop import StagedMethod
from monovlm.infer.reduction.uniform_grid import lattice_lines

MERGE_RULES = ("add", "average")


def contextual_merge(image: ImageView, dominant: torch.Tensor, num_targets: int, metric: torch.Tensor,
                     rule: str) -> ImageChoice:
    """dominant: (k - c,) indices into the image's patches kept as they are; the other patches are merged into
    num_targets evenly spaced targets among them. metric (n, D) is compared in cosine. -> ImageChoice with a mix."""
    n = image.patches.numel()
    device = image.patches.device
    is_rest = torch.ones(n, dtype=torch.bool, device=device)
    is_rest[dominant] = False
    rest = is_rest.nonzero().squeeze(1)  # (r,)
    targets = rest[lattice_lines(rest.numel(), num_targets).to(device)]  # (c,)
    joiners = rest[~torch.isin(rest, targets)]  # (r - c,)
    normed = F.normalize(metric.float(), dim=-1)
    assigned = (normed[joiners] @ normed[targets].T).argmax(dim=1)  # (r - c,) target number of each joiner
    kept = torch.cat([dominant, targets]).sort().values  # indices into the image's patches
    mix = torch.zeros(kept.numel(), n, device=device)
    mix[torch.searchsorted(kept, dominant), dominant] = 1.0
    joined = torch.bincount(assigned, minlength=num_targets).float()  # (c,)
    target_rows = torch.searchsorted(kept, targets)
    if rule == "add":
        mix[target_rows, targets] = 1.0
        mix[target_rows[assigned], joiners] = 1.0 / joined[assigned]
    else:
        mix[target_rows, targets] = 1.0 / (joined + 1)
        mix[target_rows[assigned], joiners] = 1.0 / (joined[assigned] + 1)
    return ImageChoice(image.index, image.patches[kept], image.patches, mix)


@dataclass
class VisionDrop(StagedMethod):
    name = "visiondrop"
    contextual: float = 0.125  # share of each stage's budget spent on merged contextual tokens (42 + 6 in the paper)
    merge: str = "add"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"visiondrop: contextual={self.contextual} must be in [0, 1)")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"visiondrop: merge={self.merge!r} is not one of {MERGE_RULES}")

    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        ratio = self.ratio_at(ctx)
        choices = []
        for image in ctx.images:
            n, k = image.patches.numel(), image.budget(ratio)
            if k >= n:
                choices.append(ImageChoice(image.index, image.patches))
                continue
            num_targets = math.floor(self.contextual * k + 0.5) if k >= 2 else 0
            scores = ctx.received_attention(image)
            dominant = scores.topk(k - num_targets).indices.sort().values
            if num_targets == 0:
                choices.append(ImageChoice(image.index, image.patches[dominant]))
                continue
            metric = ctx.keys(image.row)[image.patches]
            choices.append(contextual_merge(image, dominant, num_targets, metric, self.merge))
        return choices
