"""Model FLOPs per token, the machine's measured matmul peak, and MFU.

FLOPs per trained token follow the PaLM / nanoGPT convention: 6·N for the weight matmuls (forward 2N, backward 4N)
with N the non-embedding parameters of the decoder plus the embedder, plus 12·L·C·T for attention scores and values
(L layers, C width, T sequence length). MFU is achieved model FLOP/s over the peak the machine measured for a large
matmul in the training dtype — on CPUs the vendor peak is rarely known, so we measure it instead.
"""

from __future__ import annotations

import time

import torch


def flops_per_token(model, seq_len: int) -> float:
    decoder = getattr(model, "decoder", model)
    config = decoder.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if decoder.lm_head is None:  # tied head: the output matmul still costs its FLOPs
        params += decoder.embed_tokens.weight.numel()
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * seq_len
    return 6.0 * params + attention


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, size: int = 1024, seconds: float = 0.5,
                       device: str = "cpu") -> float:
    """FLOP/s of a square matmul loop in `dtype` on this machine (the denominator of MFU)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b  # warm-up (thread pools, kernels)
    if device != "cpu":
        torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2.0 * size**3 * runs / (time.perf_counter() - start)
