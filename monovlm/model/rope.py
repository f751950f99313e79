"""Rotary position embeddings: inverse frequencies for each RoPE variant, and their application to q and k.

The variants follow the formulas HF `transformers` uses for the same config fields (`modeling_rope_utils.py`), so
checkpoints that rely on Llama-3 or YaRN scaling load with exact parity.
"""

from __future__ import annotations

import math

import torch

from monovlm.config import DecoderConfig


def rope_type_of(config: DecoderConfig) -> str:
    if config.rope_scaling is None:
        return "default"
    return config.rope_scaling.get("rope_type", config.rope_scaling.get("type", "default"))


def _plain_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between is interpolated smoothly.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies with a linear ramp over the dims whose
    # rotation count at the original context length lies between beta_slow and beta_fast; scale cos/sin by mscale.
    factor = scaling.get("factor")
    original_max = scaling.get("original_max_position_embeddings", max_positions)
    if factor is None:
        factor = max_positions / original_max

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_inv_freq(config: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Return (inverse frequencies of shape (head_dim/2,), scale applied to cos and sin)."""
    dim = config.resolved_head_dim
    base = config.rope_theta
    rope_type = rope_type_of(config)
    scaling = config.rope_scaling or {}
    if rope_type == "default":
        return _plain_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _plain_inv_freq(base, dim) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_plain_inv_freq(base, dim), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, dim, scaling, config.max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope_type!r}")


class RotaryTable(torch.nn.Module):
    """cos/sin tables for positions [0, length), grown on demand; looked up by explicit position ids."""

    def __init__(self, config: DecoderConfig, initial_length: int | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(initial_length or min(config.max_position_embeddings, 4096))

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = positions[:, None] * self.inv_freq.float()[None, :]  # (L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        # rotate_half(x)·sin == roll(x, D/2)·(sin with its first half negated): the sign lives in the table, so
        # applying RoPE is one roll and one fused multiply-add instead of slices, a negation and a concatenation
        sign = torch.cat((-torch.ones_like(freqs), torch.ones_like(freqs)), dim=-1)
        self.register_buffer("cos_table", angles.cos() * self.attention_scaling, persistent=False)
        self.register_buffer("sin_table", angles.sin() * sign * self.attention_scaling, persistent=False)

    def at_positions(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, D) at any real positions (B, T), computed in float64 then cast, as the table is."""
        freqs = position_ids.double()[..., None] * self.inv_freq.double()  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        half = freqs.shape[-1]
        sign = torch.cat((-torch.ones(half), torch.ones(half))).to(angles.device, angles.dtype)
        cos = (angles.cos() * self.attention_scaling).float().unsqueeze(1).to(dtype)
        sin = (angles.sin() * sign * self.attention_scaling).float().unsqueeze(1).to(dtype)
        return cos, sin

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, 1, T, D) in `dtype`. Integer positions are looked up in the
        tables; float positions (V2PE's fractional steps) are computed from the same frequencies."""
        if position_ids.is_floating_point():
            return self.at_positions(position_ids, dtype)
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if needed > self.cos_table.shape[0]:
            self._build(max(needed, 2 * self.cos_table.shape[0]))
        cos = self.cos_table[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin_table[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the angles in cos / signed sin (B, 1, T, D), as HF's `x·cos + rotate_half(x)·sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
