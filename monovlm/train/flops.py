"""Model FLOPs per token, the machine's measured matmul peak, and MFU.

FLOPs per trained token follow the PaLM / nanoGPT convention: 6·N for the weight matmuls (forward 2N, backward 4N)
with N the non-embedding parameters of the decoder plus the embedder, plus 12·L·C·T for attention scores and values
(L layers, C width, T sequence length). MFU is achieved model FLOP/s over the peak the machine measured for a large
matmul in the training dtype — on CPUs the vendor peak is rarely known, so we measure it instead.

Training FLOPs of a step (what the trainer logs as `flops` and sums for `flops_budget`, and what
`monovlm.train.budget` predicts) are `training_flops`: the per-token figure times the trained (non-pad) tokens, plus,
in stages with EVE's align loss, a frozen teacher's forward (2·N_teacher) per visual token. Known simplifications,
kept because every run is counted alike: frozen parts are counted at 6·N like trained ones (their true backward is
cheaper), an embedder or encoder is counted per token of the whole sequence (text included) rather than per image
patch, and pretraining a vision encoder or teacher before the recipe's stages is not counted.
`measure_flops` counts what actually runs instead (torch's FlopCounterMode) for a cross-check of that convention.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def flops_per_token(model, seq_len: int) -> float:
    decoder = getattr(model, "decoder", model)
    config = decoder.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if decoder.lm_head is None:  # tied head: the output matmul still costs its FLOPs
        params += decoder.embed_tokens.weight.numel()
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * seq_len
    return 6.0 * params + attention


def teacher_params(teacher) -> int:
    """Parameters of an align teacher that runs a network (monovlm's ViT: `.vit`; an HF tower: `.model`); 0 for
    precomputed features or no teacher. A wrapper (WhitenedTeacher) counts the teacher it wraps."""
    teacher = getattr(teacher, "teacher", teacher)
    network = getattr(teacher, "vit", None)
    if network is None:
        network = getattr(teacher, "model", None)
    return 0 if network is None else sum(p.numel() for p in network.parameters())


def training_flops(tokens: float, visual_tokens: float, flops_token: float, teacher_param_count: int) -> float:
    """FLOPs of one optimizer step over `tokens` trained tokens, `visual_tokens` of them image tokens seen by the
    teacher (pass teacher_param_count=0 when the stage has no align loss)."""
    return tokens * flops_token + 2.0 * teacher_param_count * visual_tokens


def measure_flops(run: Callable[[], None]) -> float:
    """FLOPs that `run()` (e.g. one forward + backward) executes in matmuls, convolutions and attention, counted by
    torch's FlopCounterMode (elementwise ops, norms and softmax are not counted, as usual). Attention is forced onto
    the math kernel while counting: the fused CPU kernel is invisible to the counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


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
