"""Routing tokens to modality experts by a fixed modality mask (no learned router).

EVEv2's reference code computes both branches for every token and blends them with the mask, which doubles the FLOPs
of every expert part. Here each token is gathered into its own modality's branch and the results are scattered back,
so each token pays for one branch only. A forward with no visual token (text-only batches, and every decode step
over generated text) skips routing entirely and takes the text path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Flat token indices (over B·T) of each modality, computed once per forward and shared by every layer."""

    text_index: torch.Tensor  # (N_text,)
    vision_index: torch.Tensor  # (N_vision,)
    num_tokens: int

    @classmethod
    def from_mask(cls, vision_mask: torch.Tensor | None) -> "Routing | None":
        """vision_mask (B, T) bool, True at visual tokens -> Routing, or None when there is nothing to route."""
        if vision_mask is None:
            return None
        flat = vision_mask.reshape(-1)
        vision_index = flat.nonzero().squeeze(1)
        if vision_index.numel() == 0:
            return None
        text_index = (~flat).nonzero().squeeze(1)
        return cls(text_index, vision_index, flat.numel())


def route(
    x: torch.Tensor,
    routing: Routing | None,
    text_fn: Callable[[torch.Tensor], torch.Tensor],
    vision_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Apply text_fn to text tokens and vision_fn to visual tokens of x (B, T, C) -> (B, T, C_out)."""
    if routing is None or vision_fn is None:
        return text_fn(x)
    leading = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])  # (B·T, C)
    text_out = text_fn(flat.index_select(0, routing.text_index))  # (N_text, C_out)
    vision_out = vision_fn(flat.index_select(0, routing.vision_index))  # (N_vision, C_out)
    out = text_out.new_empty(routing.num_tokens, text_out.shape[-1])
    out = out.index_copy(0, routing.text_index, text_out).index_copy(0, routing.vision_index, vision_out)
    return out.view(*leading, -1)
