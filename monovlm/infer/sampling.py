"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, all seeded through one generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V): everything below the k-th largest value becomes -inf."""
    k = min(k, logits.shape[-1])
    kth_value = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_value, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (B, V): keep the most likely tokens until their cumulative probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens ranked above it already reach p; the top token is always kept
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / settings.temperature
    if settings.top_k is not None:
        logits = filter_top_k(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1:
        logits = filter_top_p(logits, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
