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

At batch 1 on a CPU the step is bound by reading the weights (21 MB per token at the benchmark's tiny config), so
three inductor settings matter more than anything in the graph (measured in BENCHMARKS.md):
- `freezing`: the weights become constants of the graph and are prepacked for MKL's GEMV (~35% less time in the
  matmuls). Constants go stale if the weights change afterwards, so each decoder's graphs are tied to a fingerprint
  of its parameters (storage and in-place version counters) and are rebuilt when it changes.
- `cpp_wrapper`: the graph's kernel calls run from C++, not from a Python wrapper (~0.1 ms per step).
- guard evaluation is skipped after a graph's first call (`skip_guard_eval_unsafe`): the guards re-check every
  parameter and cache tensor on each call (~0.1 ms per step in an A/B run here). It is safe here because every call
  site is ours: each decoder gets its own copy of the step function (its own code object, so its own graph cache),
  and a call whose (batch, capacity, dtype, device) has not been seen before always runs with the full guards,
  compiling when needed.

Together with a leaner `generate` loop these took the batch-1 step from ~1.3 ms to ~1.05 ms (fp32, 2 cores), of
which ~0.8 ms is the matrix-vector products themselves.

The step is built from the decoder's own pieces (`Attention.project_qkv`, `Attention.probabilities`, the blocks' norms
and MLPs), so an attention variant is written once. Used by `generate(..., GenerationConfig(compile=True))` for a plain
`KVCache` (decode steps are text: no expert routing) of a model without a sliding window, and without a decoding
strategy; anything else falls back to the eager step.
"""

from __future__ import annotations

import types
import weakref

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from monovlm.model.kv_cache import KVCache

CAPACITY_MULTIPLE = 256
INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}
_compiled_steps: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()


def static_capacity(length: int) -> int:
    """Cache slots for `length` tokens, rounded up so that one compiled graph serves many prompt lengths."""
    return -(-length // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def supports_static_decode(model, cache) -> bool:
    decoder = getattr(model, "decoder", model)
    # the static step looks RoPE up in the integer tables and has no h/w part: V2PE and native RoPE take the eager step
    return (isinstance(cache, KVCache) and decoder.config.sliding_window is None
            and decoder.config.visual_position_step == 1 and not decoder.config.native_rope)


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
        q, k, v = attn.project_qkv(block.attn_norm(x), cos, sin)  # (B, H, 1, D), (B, Hkv, 1, D) twice
        layer_keys.index_copy_(2, slot, k)
        layer_values.index_copy_(2, slot, v)
        out = masked_attention(attn, q, layer_keys, layer_values, key_mask)  # (B, H, 1, D)
        x = x + attn.o_proj(out.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.mlp_norm(x))
    position.add_(1)
    slot.add_(1)
    return F.linear(decoder.norm(x)[:, -1], decoder.output_weight)  # (B, V)


def masked_attention(attn, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """One query per row over the whole cache, written out (not SDPA) so that inductor fuses it into the step.

    q (B, H, 1, D); keys/values (B, Hkv, S, D); key_mask (B, 1, 1, S) -> (B, H, 1, D). The probabilities are the
    layer's own (`Attention.probabilities`); query heads are grouped onto their shared value head by a reshape."""
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    probs = attn.probabilities(q, keys, key_mask).to(values.dtype)  # (B, H, 1, S)
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads, -1)  # (B, Hkv, G, S)
    return (grouped @ values).reshape(batch, heads, 1, dim)  # (B, H, 1, D)


class StaticDecoder:
    """Runs the decode steps of one generation over a prefilled cache, through the compiled step."""

    def __init__(self, model, cache: KVCache, compile: bool = True):
        self.decoder = getattr(model, "decoder", model)
        cache.allocate()
        self.keys, self.values = list(cache.keys), list(cache.values)
        self.key_mask = (cache.segment_ids != 0)[:, None, None, :].clone()  # (B, 1, 1, S): filled, real slots
        self.key_mask[..., cache.length :] = False
        self.position = cache.next_position[:, None].clone()  # (B, 1)
        self.slot = torch.tensor([cache.length], device=self.position.device)
        self.cache = cache
        self.step_fn = compiled_step(self.decoder) if compile else decode_step

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next logits (B, V); keeps the cache's bookkeeping in step with the writes."""
        cache = self.cache
        if cache.length >= cache.max_length:
            raise ValueError(f"KV cache is full: {cache.length} slots of {cache.max_length} used")
        logits = self.step_fn(self.decoder, tokens[:, None], self.position, self.slot, self.key_mask, self.keys,
                              self.values)
        cache.segment_ids[:, cache.length] = 1
        cache.length += 1
        return logits


def weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced, moved, cast or modified in place (optimizer steps and
    `load_state_dict` bump the version counter)."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*module.parameters(), *module.buffers()))


def _reusable_skip_guards():
    """`torch.compiler.set_stance(skip_guard_eval_unsafe=True)` built once and entered per step: building one costs
    ~90 µs (more than the guards it skips), entering a built one ~3 µs. Building it also switches the stance at
    once, so it is switched straight back; each `with` then sets it and restores the stance found at build time."""
    stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    stance.__exit__(None, None, None)
    return stance


class CompiledStep:
    """`decode_step` compiled for one decoder, with frozen weights and guards skipped on calls seen before."""

    def __init__(self, decoder):
        self.fingerprint = weights_fingerprint(decoder)
        # A fresh code object: dynamo keeps its graphs per code object, so this decoder's graphs never mix with
        # another decoder's (which matters once guards are skipped).
        code = decode_step.__code__.replace()
        own_step = types.FunctionType(code, decode_step.__globals__, decode_step.__name__)
        self.compiled = torch.compile(own_step, dynamic=False, fullgraph=True)
        self.seen: set[tuple] = set()
        self.skip_guards = _reusable_skip_guards()

    def __call__(self, decoder, token, position, slot, key_mask, keys, values) -> torch.Tensor:
        signature = (tuple(token.shape), tuple(key_mask.shape), keys[0].dtype, keys[0].device)
        if signature in self.seen:
            with self.skip_guards:
                return self.compiled(decoder, token, position, slot, key_mask, keys, values)
        with inductor_config.patch(INDUCTOR_OPTIONS):  # the options are read when the graph compiles
            logits = self.compiled(decoder, token, position, slot, key_mask, keys, values)
        self.seen.add(signature)
        return logits


def compiled_step(decoder) -> CompiledStep:
    """The compiled `decode_step` for this decoder: compiled once, reused by every generation, and rebuilt when the
    decoder's weights changed since (frozen weights are constants of the graph)."""
    step = _compiled_steps.get(decoder)
    if step is None or step.fingerprint != weights_fingerprint(decoder):
        if step is not None:
            torch._dynamo.reset()  # drop every graph holding the old weights; other decoders recompile on next use
            _compiled_steps.clear()
        step = CompiledStep(decoder)
        _compiled_steps[decoder] = step
    return step
