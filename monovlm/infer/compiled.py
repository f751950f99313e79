"""Decode steps as one compiled graph: static shapes, tensors for every changing number, `torch.compile` over it.

At small sizes an eager decode step is bound by per-op dispatch and Python (about 35 small ops per layer), not by
arithmetic. This module rewrites the one-token step so that nothing in it changes shape from step to step:

- every layer attends over its whole preallocated cache (B, Hkv, S, D) with a boolean key mask (B, 1, 1, S) instead
  of a slice that grows by one each step;
- the new key/value is written with `index_copy_` at a slot held in a tensor, the mask slot is switched on with
  `index_fill_`, and the RoPE position is a (B, 1) tensor: no Python int enters the graph;
- the capacity S is rounded up (to a multiple of 256) so that prompts of different lengths reuse one graph.

`torch.compile` then turns the step into one graph (inductor: fused C++ kernels on CPU, Triton on GPU). The prefill
stays eager: it runs once and its shapes change with every prompt. Masked slots hold zeros and get exactly zero
attention weight, so the logits equal the eager step's up to float rounding (tested at atol 1e-5).

Used by `generate(..., GenerationConfig(compile=True))` for plain decoder-only caches (no token reduction, no sliding
window, no decoding strategy); anything else falls back to the eager step.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from monovlm.model.kv_cache import KVCache
from monovlm.model.rope import apply_rotary

CAPACITY_MULTIPLE = 256
_compiled_steps: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def static_capacity(length: int) -> int:
    """Cache slots for `length` tokens, rounded up so that one compiled graph serves many prompt lengths."""
    return -(-length // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def supports_static_decode(model, cache: KVCache) -> bool:
    decoder = getattr(model, "decoder", model)
    return not cache.reduced and len(cache.groups) == 1 and decoder.config.sliding_window is None


def decode_step(decoder, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """One token per row through the decoder with static shapes; returns logits (B, V).

    token (B, 1) ids; position (B, 1) RoPE positions; slot (1,) the cache index to write; key_mask (B, 1, 1, S)
    True where a cached key may be attended; keys/values per layer (B, Hkv, S, D). Mutates the cache, the mask, and
    advances position and slot by one."""
    x = decoder.embed_tokens(token)  # (B, 1, C)
    rotary = decoder.rotary
    cos = rotary.cos_table[position].unsqueeze(1).to(x.dtype)  # (B, 1, 1, D)
    sin = rotary.sin_table[position].unsqueeze(1).to(x.dtype)
    key_mask.index_fill_(3, slot, True)
    for block, layer_keys, layer_values in zip(decoder.layers, keys, values):
        attn = block.attn
        heads, kv_heads = attn.num_heads, attn.num_kv_heads
        qkv = attn.project(block.attn_norm(x)).transpose(1, 2)  # (B, H + 2·Hkv, 1, D)
        qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)  # q and k rotated together
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        layer_keys.index_copy_(2, slot, k)
        layer_values.index_copy_(2, slot, v)
        out = F.scaled_dot_product_attention(q, layer_keys, layer_values, attn_mask=key_mask,
                                             enable_gqa=kv_heads != heads)  # (B, H, 1, D)
        x = x + attn.o_proj(out.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.mlp_norm(x))
    position.add_(1)
    slot.add_(1)
    return F.linear(decoder.norm(x)[:, -1], decoder.output_weight)  # (B, V)


class StaticDecoder:
    """Runs the decode steps of one generation over a prefilled cache, through the compiled step."""

    def __init__(self, model, cache: KVCache, compile: bool = True):
        self.decoder = getattr(model, "decoder", model)
        group = cache.groups[0]
        group.allocate()
        self.keys, self.values = list(group.keys), list(group.values)
        self.key_mask = (group.segment_ids != 0)[:, None, None, :].clone()  # (B, 1, 1, S): filled, real slots
        self.key_mask[..., group.length :] = False
        self.position = cache.next_position[:, None].clone()  # (B, 1)
        self.slot = torch.tensor([group.length], device=self.position.device)
        self.cache, self.group = cache, group
        self.step_fn = compiled_step(self.decoder) if compile else decode_step

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next logits (B, V); keeps the cache's bookkeeping in step with the writes."""
        if self.group.length >= self.group.capacity:
            raise ValueError(f"KV cache is full: {self.group.length} slots of {self.group.capacity} used")
        logits = self.step_fn(self.decoder, tokens[:, None], self.position, self.slot, self.key_mask, self.keys,
                              self.values)
        self.group.segment_ids[:, self.group.length] = 1
        self.group.length += 1
        return logits


def compiled_step(decoder):
    """The compiled `decode_step` for this decoder (compiled once, reused by every generation)."""
    step = _compiled_steps.get(decoder)
    if step is None:
        step = torch.compile(decode_step, dynamic=False, fullgraph=True)
        _compiled_steps[decoder] = step
    return step
