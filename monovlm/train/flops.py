"""Model FLOPs per token, the machine's matmul peak (measured, cached per machine), and MFU.

FLOPs per trained token follow the PaLM / nanoGPT convention, 6·N for N trainable weights (forward 2N, backward
4N) plus 12·L·C·T for attention scores and values (L layers, C width, T sequence length), with frozen parts counted
at what they really run. Per token, a weight matrix of N parameters costs
- 2·N forward, always;
- 2·N for the gradient of its input (the backward through the activations), when a trainable parameter lies
  upstream of it on the data path: its input then needs a gradient, so autograd computes it even though the weight
  itself is frozen;
- 2·N for the gradient of its weight, only when it trains.
A trainable weight is counted at 6·N as in the convention (the first trainable part's input gradient, which
autograd skips when nothing before it trains, is not discounted). A frozen part costs 4·N behind a trainable one
(EVE's decoder while only the patch embedding trains, LLaVA's decoder behind a training projector) and 2·N with
nothing trainable before it (LLaVA's frozen vision encoder). Likewise a layer's attention costs 4·C·T forward plus
8·C·T backward when anything at or before that layer trains. "Upstream" is decided per station of the data path:
vision encoder, then embedder / projector and token embeddings, then each decoder layer, then the output head;
within one station no order is assumed (the shipped recipes freeze or train whole parts, so this never matters
there). N counts the non-embedding parameters of the decoder plus the embedder (norm weights included, as usual),
and a tied output head once as a matmul.

Training FLOPs of a step (what the trainer logs as `flops`, and what benchmarks/flops_budget.py predicts) are
`training_flops`: the per-token figure times the trained (non-pad) tokens, plus, in stages with EVE's align loss, a
frozen teacher's forward (2·N_teacher) per visual token. Known simplifications, kept because every run is counted
alike: an embedder or encoder is counted per token of the whole sequence (text included) rather than per image
patch, the output head per token although the loss runs it on labelled positions only, a decoder with modality
experts with both copies of each expert weight per token (each token runs one of them), EVE's align head not at all,
and pretraining a vision encoder or teacher before the recipe's stages is not counted.
`measure_flops` counts what actually runs instead (torch's FlopCounterMode) for a cross-check of that convention:
on the shipped recipes at toy scale, measured / counted FLOPs per stage is 0.85-1.25, except evev2's 0.5-0.6 (its
expert copies), so its MFU reads about twice too high.

MFU is achieved FLOP/s over the machine's peak for a large matmul in the training dtype. On CPUs the vendor peak is
rarely known, so it is measured: the best of many short matmul bursts over a few sizes, so that a burst slowed by
other processes does not lower it. A start on a busy machine can still measure low (on a shared 2-core machine we saw
a quarter of the quiet peak), so the best peak ever measured is kept per machine, thread count, device, dtype and
torch version in ~/.cache/monovlm/peak_flops.json (`$XDG_CACHE_HOME` honoured); each later start measures briefly
and keeps the higher figure. The environment variable MONOVLM_PEAK_CACHE names another cache file, or turns the
cache off with "off" (then every start measures in full and keeps nothing).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from monovlm.files import write_text_atomic

PEAK_CACHE_ENV = "MONOVLM_PEAK_CACHE"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_HEAD_STATION = 1 << 30  # after every decoder layer


# -------------------------------------------------------------------------------------------------------------------
# FLOPs per token


def data_path_station(name: str) -> int:
    """Where a parameter's matmul sits on the data path, as an orderable number: vision encoder (0), embedder,
    projector and token embeddings (1), decoder layer i (2 + i), final norm and output head (last). Works on the
    names of an encoder-free VLM, the baseline, the trainer's wrapper (`model.` prefix) and a bare decoder."""
    name = name.removeprefix("model.")
    if name.startswith("embedder.encoder."):
        return 0
    if name.startswith("embedder.") or name.endswith("embed_tokens.weight"):
        return 1
    layer = _LAYER.search(name)
    if layer is not None:
        return 2 + int(layer.group(1))
    return _HEAD_STATION


def _first_trainable_station(model: nn.Module) -> int | None:
    stations = [data_path_station(name) for name, param in model.named_parameters() if param.requires_grad]
    return min(stations, default=None)


def weight_flops(station: int, numel: int, trains: bool, first_trainable: int | None) -> float:
    """Per-token FLOPs of a weight of `numel` parameters at `station` (see the module docstring): forward, plus its
    input's gradient when something upstream trains (or, by convention, when it trains), plus its weight's gradient
    when it trains."""
    input_gradient = trains or (first_trainable is not None and first_trainable < station)
    return 2.0 * numel * (1 + int(input_gradient) + int(trains))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of `model` as its `requires_grad` flags stand (set the stage's trainable parts
    first), for sequences of `seq_len` tokens."""
    decoder = getattr(model, "decoder", model)
    config = decoder.config
    first_trainable = _first_trainable_station(model)
    total = 0.0
    for name, param in model.named_parameters():
        station = data_path_station(name)
        if name.endswith("embed_tokens.weight"):
            if decoder.lm_head is not None:
                continue  # a lookup, no matmul
            station = _HEAD_STATION  # tied: the output matmul still costs its FLOPs
        total += weight_flops(station, param.numel(), param.requires_grad, first_trainable)
    for layer in range(config.num_layers):  # attention scores and values: no weights, a gradient only when needed
        backward = first_trainable is not None and first_trainable <= 2 + layer
        total += (4 + 8 * int(backward)) * config.num_heads * config.resolved_head_dim * seq_len
    return total


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


# -------------------------------------------------------------------------------------------------------------------
# the machine's peak


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, size: int, seconds: float, device: str = "cpu", min_bursts: int = 3) -> float:
    """The best FLOP/s of single `size`×`size` matmuls (2·size³ FLOPs each) timed one by one for `seconds` (at
    least `min_bursts` of them): the peak, not an average that a busy moment drags down."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)  # warm-up: thread pools, kernels
    best, bursts = 0.0, 0
    deadline = time.perf_counter() + seconds
    while bursts < min_bursts or time.perf_counter() < deadline:
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _synchronize(device)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
        bursts += 1
    return best


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                       sizes: tuple[int, ...] | None = None, seconds: float = 0.75) -> float:
    """FLOP/s of the best matmul burst in `dtype` over `sizes` (`seconds` each); the fastest size differs by dtype and
    machine (on a 2-core CPU fp32 can peak at 1024 and bf16 at 2048), so several are tried."""
    if sizes is None:
        sizes = (4096, 8192) if device.startswith("cuda") else (1024, 2048)
    return max(matmul_rate(dtype, size, seconds, device) for size in sizes)


def peak_cache_path() -> Path | None:
    """The peak cache file: $MONOVLM_PEAK_CACHE when set ("off" or empty: no cache), else
    $XDG_CACHE_HOME/monovlm/peak_flops.json (default ~/.cache)."""
    chosen = os.environ.get(PEAK_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else Path(chosen)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "monovlm" / "peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_key(dtype: torch.dtype, device: str) -> str:
    """What the peak depends on: the chip, the threads torch uses (CPU), the dtype and torch's kernels."""
    if device.startswith("cuda"):
        chip = torch.cuda.get_device_name(torch.device(device))
    else:
        chip = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    return f"{chip} | {device.split(':')[0]} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def _read_cache(path: Path) -> dict[str, float]:
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again and rewrite it
    return peaks if isinstance(peaks, dict) else {}


def _write_cache(path: Path, peaks: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(peaks, indent=1, sort_keys=True))


def peak_flops(dtype: torch.dtype, device: str, cache: Path | None, recheck_seconds: float = 0.2) -> float:
    """The machine's matmul peak in `dtype` (FLOP/s): the best of the `cache` file's figure for this machine (e.g.
    `peak_cache_path()`; None: no cache) and a measurement now — brief (`recheck_seconds` per size) when the cache
    has a figure, in full when not. The best is written back, so a peak first measured on a busy machine rises at
    the next quiet start instead of staying low."""
    key = peak_key(dtype, device)
    peaks = _read_cache(cache) if cache is not None else {}
    cached = peaks.get(key)
    cached = float(cached) if isinstance(cached, (int, float)) and cached > 0 else None
    if cached is None:
        peak = measure_peak_flops(dtype, device)
    else:
        peak = max(cached, measure_peak_flops(dtype, device, seconds=recheck_seconds))
    if cache is not None and peak != cached:
        _write_cache(cache, {**peaks, key: peak})
    return peak


@functools.cache  # measured once per process, so every caller in a run sees the same choice
def autocast_dtype(device: str, size: int = 256, repeats: int = 3) -> tuple[str, str]:
    """The autocast dtype "auto" means on this device: (dtype name, why). CUDA: bfloat16 where supported, else
    float16. CPU: bfloat16 only if a bf16 matmul runs at least as fast as a float32 one here — CPUs without
    AVX512-BF16 or AMX emulate bf16 matmuls at a small fraction of fp32 speed (measured 0.4 vs 17 GFLOP/s on an
    AVX2-only core), which would make a training run tens of times slower."""
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA with bf16 support"
        return "float16", "CUDA without bf16 support"
    if device != "cpu":
        return "float32", f"device {device!r}"
    speeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b  # warm-up: kernel selection, caches
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        speeds[dtype] = 2 * size**3 * repeats / max(time.perf_counter() - started, 1e-9)
    fp32, bf16 = speeds[torch.float32] / 1e9, speeds[torch.bfloat16] / 1e9
    if bf16 >= fp32:
        return "bfloat16", f"bf16 matmul {bf16:.0f} GFLOP/s >= fp32 {fp32:.0f} on this CPU"
    return "float32", f"bf16 matmul {bf16:.1f} GFLOP/s < fp32 {fp32:.1f} on this CPU (no native bf16)"
