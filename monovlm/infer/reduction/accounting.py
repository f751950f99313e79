"""What a generation costs, with or without token reduction: theoretical FLOPs from the tokens each layer processed,
and measured prefill time, decode time per token and memory (for the benchmark harness to call).

FLOPs count the decoder's matmuls, 2 per multiply-add: per token and layer the q/k/v and output projections and the
SwiGLU MLP (a token with modality experts still goes through one branch), plus 4·H·D per (query, visible key) pair
for scores and values, plus the output head for each token whose logits are computed (the last prompt token, then
one per decode step). Layers before a reduction count the full prompt — that is what they ran. Counts are of real
tokens per row (a padded batch computes its padding too, which is a property of the batching, not the method).
Not counted: the embedder (the same with and without reduction) and the scorers' own work (a few attention rows,
small next to a layer; DivPrune's greedy loop and ToMe's matching are O(n²) in an image's patches).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monovlm.config import DecoderConfig
from monovlm.infer.generate import prefill


@dataclass
class FlopsEstimate:
    prefill: float
    decode: float  # all decode steps together

    @property
    def total(self) -> float:
        return self.prefill + self.decode

    def __add__(self, other: FlopsEstimate) -> FlopsEstimate:
        return FlopsEstimate(self.prefill + other.prefill, self.decode + other.decode)


def linear_flops_per_token(config: DecoderConfig) -> float:
    """One token through one layer's projections and MLP."""
    width, head_dim = config.hidden_size, config.resolved_head_dim
    qkv = width * (config.num_heads + 2 * config.num_kv_heads) * head_dim
    out = config.num_heads * head_dim * width
    mlp = 3 * width * config.intermediate_size
    return 2.0 * (qkv + out + mlp)


def attention_flops(config: DecoderConfig, pairs: float) -> float:
    """Scores and weighted values for `pairs` (query, visible key) pairs in one layer."""
    return 4.0 * config.num_heads * config.resolved_head_dim * pairs


def sequence_flops(config: DecoderConfig, tokens_per_layer: Sequence[int], decode_steps: int) -> FlopsEstimate:
    """One sequence: tokens_per_layer[l] tokens entering layer l at prefill (causal), then decode_steps one-token
    forwards, each attending to what that layer caches plus the tokens decoded so far."""
    if len(tokens_per_layer) != config.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {config.num_layers} layers")
    linear = linear_flops_per_token(config)
    head = 2.0 * config.hidden_size * config.vocab_size
    prefill = sum(t * linear + attention_flops(config, t * (t + 1) / 2) for t in tokens_per_layer) + head
    steps = decode_steps
    decode = steps * (config.num_layers * linear + head) + sum(
        attention_flops(config, steps * t + steps * (steps + 1) / 2) for t in tokens_per_layer)
    return FlopsEstimate(prefill, decode)


def generation_flops(model, prompt_tokens: Sequence[int], decode_steps: int, trace=None) -> FlopsEstimate:
    """Summed over the rows of a batch: prompt_tokens[b] real prompt tokens of row b, decode_steps one-token forwards
    per row (generate runs max_new_tokens - 1 of them), and the reduction's `Trace` (`reduction.last_trace`) if the
    prefill reduced tokens — without one every layer counts the full prompt."""
    config = getattr(model, "decoder", model).config
    if trace is not None:
        if list(trace.prompt_tokens) != list(prompt_tokens):
            raise ValueError(f"the trace is of prompts with {trace.prompt_tokens} tokens, not {list(prompt_tokens)}")
        per_row = trace.tokens_per_layer()
    else:
        per_row = [[t] * config.num_layers for t in prompt_tokens]
    total = FlopsEstimate(0.0, 0.0)
    for tokens in per_row:
        total = total + sequence_flops(config, tokens, decode_steps)
    return total


@dataclass
class Measurement:
    prefill_ms: float  # median over repeats
    decode_ms_per_token: float  # median over repeats of the mean one-token forward
    peak_memory_bytes: int | None  # CUDA allocator peak over the measured runs (weights included); None on CPU
    kv_cache_bytes: int  # KV storage allocated after the prefill (shrinks with reduction)
    tokens_per_layer: list[list[int]]  # per row, real tokens each layer processed at prefill


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_generation(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       images: list[torch.Tensor] | None = None, reduction=None, new_tokens: int = 16,
                       repeats: int = 3, warmup: int = 1) -> Measurement:
    """Time a greedy prefill and new_tokens - 1 cached decode steps (no stop ids, so every run does the same work).

    input_ids (B, T) left-padded with attention_mask, images for a VLM, and an optional `Reduction`. Call it once
    per setting in the same process and compare ratios; timings are wall-clock with device synchronisation."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 to time at least one decode step")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    device = input_ids.device
    batch, length = input_ids.shape
    extra = {}
    if images is not None:
        extra["images"] = images
    if reduction is not None:
        extra["reduction"] = reduction

    def run() -> tuple[float, float, int]:
        _sync(device)
        start = time.perf_counter()
        logits, step, cache = prefill(model, input_ids, attention_mask, length + new_tokens, extra)
        token = logits.argmax(dim=-1)
        _sync(device)
        prefilled = time.perf_counter()
        kv_bytes = cache.nbytes
        for _ in range(new_tokens - 1):
            token = step(token).argmax(dim=-1)
        _sync(device)
        return (prefilled - start) * 1e3, (time.perf_counter() - prefilled) * 1e3 / (new_tokens - 1), kv_bytes

    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = [run() for _ in range(repeats)]
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    if reduction is not None and reduction.last_trace is not None:
        tokens_per_layer = reduction.last_trace.tokens_per_layer()
    else:
        real = (attention_mask != 0).sum(dim=1).tolist() if attention_mask is not None else [length] * batch
        num_layers = getattr(model, "decoder", model).config.num_layers
        tokens_per_layer = [[int(t)] * num_layers for t in real]
    return Measurement(statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), peak,
                       results[-1][2], tokens_per_layer)
