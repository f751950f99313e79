"""ToMe-style bipartite token merging of each image's patches (before the decoder by default).

Rounds of bipartite soft matching until the image is down to its budget: the current tokens alternate into sets A
(even) and B (odd); each A token's most similar B token (cosine of this layer's head-averaged keys before RoPE) is
its edge; the r most similar edges merge (r at most |A| per round), the A token folding into the B token as a
size-weighted average. A merged token keeps the place and position of its B token. Merged metrics are the
size-weighted means of their members' metrics. ToMe's proportional attention (a log-size bias in attention) is not
applied: it would need a float attention bias in every later layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext


def bipartite_merge(metric: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (n, D) -> (kept (k,) indices of the surviving tokens, ascending; weights (k, n), rows summing to 1)."""
    n = metric.shape[0]
    members = torch.eye(n, dtype=torch.float64, device=metric.device)  # (current, original) sizes
    representative = torch.arange(n, device=metric.device)  # the original index each current token stands at
    while members.shape[0] > k:
        current = members.shape[0]
        features = F.normalize(members @ metric.double() / members.sum(dim=1, keepdim=True), dim=-1)
        a = torch.arange(0, current, 2, device=metric.device)  # A: even tokens, B: odd tokens
        b = torch.arange(1, current, 2, device=metric.device)
        r = min(current - k, a.numel())
        best, partner = (features[a] @ features[b].T).max(dim=1)  # each A token's most similar B token
        merging = best.topk(r).indices  # the r A tokens with the most similar partners
        members = members.index_add(0, b[partner[merging]], members[a[merging]])  # several A may join one B
        survivors = torch.ones(current, dtype=torch.bool, device=metric.device)
        survivors[a[merging]] = False
        members, representative = members[survivors], representative[survivors]
    order = representative.argsort()
    members, representative = members[order], representative[order]
    return representative, (members / members.sum(dim=1, keepdim=True)).float()


@dataclass
class ToMe(OneLayerMethod):
    name = "tome"
    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        choices = []
        for image in ctx.images:
            k = image.budget(self.keep)
            if k >= image.patches.numel():
                choices.append(ImageChoice(image.index, image.patches))
                continue
            kept, weights = bipartite_merge(ctx.keys(image.row)[image.patches], k)
            choices.append(ImageChoice(image.index, image.patches[kept], image.patches, weights))
        return choices
