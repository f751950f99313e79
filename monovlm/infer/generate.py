"""Batched generation with a preallocated KV cache: left padding, samplers, stop ids and strings, streaming.

The loop is deliberately plain: one prefill forward over the (left-padded) prompts, then one single-token forward per
step. Everything that would cost a device sync or an allocation per step is kept out of it, because at small sizes
the decode loop is bound by Python overhead, not arithmetic.

Any model with `forward(input_ids=, attention_mask=, cache=, last_only=True, **prefill_inputs) -> logits` whose
cache `KVCache.for_model` can size works: the language decoder, and the VLM (`prefill_inputs={"images": [...]}`).
A token reduction in `prefill_inputs["reduction"]` brings its own cache, which runs the decode steps (`prefill`).

An optional decoding `strategy` (`monovlm.infer.decoding`: VCD, debias calibration, DAMRO) transforms each step's
logits before the sampler and runs its own auxiliary forwards; without one the loop does no extra work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from monovlm.infer.sampling import SamplingSettings, sample_next
from monovlm.infer.strategy import DecodingStrategy
from monovlm.model.kv_cache import KVCache


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: Sequence[int] = ()  # generation of a row ends after it emits one of these (e.g. eos)
    stop_strings: Sequence[str] = ()  # ...or once its decoded text contains one of these (needs a tokenizer)
    seed: int | None = None  # seeds the sampler's own generator; the global RNG is never touched
    # decode steps through one torch.compile'd static-shape graph (`monovlm.infer.compiled`); the first call compiles
    # (tens of seconds), later ones reuse it. Falls back to the eager step where it does not apply.
    compile: bool = False
    sampling: SamplingSettings = field(init=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        self.sampling = SamplingSettings(self.temperature, self.top_k, self.top_p)
        self.stop_ids = tuple(self.stop_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens (a final stop id included)
    text: str | None  # decoded text, cut before any stop string; None without a tokenizer
    finish_reason: str  # "stop" (stop id or string) or "length" (max_new_tokens)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids (B, T) and attention_mask (B, T), right-aligned so all rows end together."""
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


class _StopStrings:
    """Tracks, per row, whether the decoded continuation contains a stop string (which may span several tokens)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        # enough recent tokens to hold the longest stop string even if every token were one byte
        self.tail_tokens = max((len(s.encode()) for s in self.stop_strings), default=0) + 2
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")

    def hit(self, generated: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(generated[-self.tail_tokens :])
        return any(s in tail for s in self.stop_strings)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_length: int,
            prefill_inputs: dict | None = None) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], object]:
    """The prompt's forward into a fresh KV cache of max_length slots -> (next-token logits (B, V), step, cache):
    step(tokens (B,)) feeds one token per row through that cache and returns the next logits (B, V).

    With a token reduction in prefill_inputs, the cache is the reduction's own (one KV cache per group of layers),
    and the steps go through it (`ReducedCache.decode`)."""
    inputs = dict(prefill_inputs or {})
    reduction = inputs.get("reduction")
    batch = input_ids.shape[0]
    if reduction is None:
        cache = KVCache.for_model(model, batch, max_length)
        step = lambda tokens: model(input_ids=tokens[:, None], cache=cache, last_only=True)[:, -1]  # noqa: E731
    else:
        cache = reduction.new_cache(model, batch, max_length)
        step = lambda tokens: cache.decode(tokens[:, None], last_only=True)[:, -1]  # noqa: E731
    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, last_only=True, **inputs)[:, -1]
    return logits, step, cache


@torch.inference_mode()
def token_steps(
    model,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    tokenizer=None,
    pad_id: int = 0,
    prefill_inputs: dict | None = None,
    strategy: DecodingStrategy | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next_tokens (B,), active (B,) bool) per step; inactive rows (already stopped) carry pad_id.

    A row becomes inactive after the step in which it emits a stop id or completes a stop string. `prefill_inputs`
    go to the first forward only (e.g. the images of a VLM prompt). A `strategy` starts before the main prefill and
    turns every step's logits into the ones the sampler sees; its auxiliary forwards get the same tokens.
    """
    batch, prompt_len = input_ids.shape[:2]
    device = input_ids.device
    if config.max_new_tokens == 0:
        return
    capacity = prompt_len + config.max_new_tokens
    if config.compile:
        from monovlm.infer.compiled import static_capacity

        capacity = static_capacity(capacity)  # one compiled graph for many prompt lengths
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop_ids = torch.tensor(config.stop_ids, dtype=torch.long, device=device)
    stop_strings = _StopStrings(config.stop_strings, tokenizer)
    generated: list[list[int]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool, device=device)
    run = None
    if strategy is not None:
        run = strategy.start(model, input_ids, attention_mask, prefill_inputs, config.max_new_tokens)
    logits, decode, cache = prefill(model, input_ids, attention_mask, capacity, prefill_inputs)
    if run is not None:
        logits = run.process(logits)
    if config.compile and run is None:
        from monovlm.infer.compiled import StaticDecoder, supports_static_decode

        if supports_static_decode(model, cache):
            decode = StaticDecoder(model, cache)
    all_active = True  # a Python mirror of active.all(): while it holds, padding and the any() check are skipped
    for step in range(config.max_new_tokens):
        next_tokens = sample_next(logits, config.sampling, generator)  # (B,)
        if not all_active:
            next_tokens = torch.where(active, next_tokens, torch.full_like(next_tokens, pad_id))
        yield next_tokens, active  # `active` is replaced below, never changed in place, so no copy is needed
        if stop_ids.numel():
            active = active & ~torch.isin(next_tokens, stop_ids)
        if stop_strings.stop_strings:
            active = active.clone()
            for row, token in enumerate(next_tokens.tolist()):
                if active[row]:
                    generated[row].append(token)
                    if stop_strings.hit(generated[row]):
                        active[row] = False
        if step + 1 == config.max_new_tokens:
            return
        if stop_ids.numel() or stop_strings.stop_strings:
            all_active = bool(active.all())
            if not all_active and not bool(active.any()):
                return
        logits = decode(next_tokens)
        if run is not None:
            logits = run.process(logits, next_tokens)


def _prepare(prompts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(prompts, torch.Tensor):
        return prompts, None
    return left_pad(prompts, pad_id)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    tokenizer=None,
    pad_id: int = 0,
    prefill_inputs: dict | None = None,
    strategy: DecodingStrategy | None = None,
) -> list[Generation]:
    """Generate a continuation for each prompt (token lists of any lengths, or an unpadded (B, T) tensor).
    `prefill_inputs` go to the prompt's forward, e.g. {"images": [...]} for a VLM; `strategy` (None = plain
    decoding) transforms each step's logits before the sampler, e.g. `monovlm.infer.decoding.VCD()`."""
    config = config or GenerationConfig()
    input_ids, attention_mask = _prepare(prompts, pad_id)
    device = _device_of(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    batch = input_ids.shape[0]
    steps = list(token_steps(model, input_ids, attention_mask, config, tokenizer, pad_id, prefill_inputs, strategy))
    # one conversion to Python lists at the end, not one tensor index per token
    all_tokens = torch.stack([tokens for tokens, _ in steps], dim=1).tolist() if steps else [[] for _ in range(batch)]
    all_active = torch.stack([active for _, active in steps], dim=1).tolist() if steps else [[] for _ in range(batch)]
    results = []
    for row in range(batch):
        ids = [token for token, active in zip(all_tokens[row], all_active[row]) if active]
        stopped = len(ids) < config.max_new_tokens or (ids and ids[-1] in config.stop_ids)
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if config.stop_strings:
                cut = cut_at_stop(text, config.stop_strings)
                stopped = stopped or cut != text
                text = cut
        results.append(Generation(ids, text, "stop" if stopped else "length"))
    return results


def stream_text(
    model,
    prompts: Sequence[Sequence[int]],
    tokenizer,
    config: GenerationConfig | None = None,
    pad_id: int = 0,
    prefill_inputs: dict | None = None,
    strategy: DecodingStrategy | None = None,
) -> Iterator[list[str]]:
    """Yield, per decode step, the new text of each row ("" when a row has nothing new to show).

    Text is held back while it could still turn into a stop string or ends in an incomplete UTF-8 character, so the
    concatenated deltas equal the final text of `generate` exactly.
    """
    config = config or GenerationConfig()
    input_ids, attention_mask = _prepare(prompts, pad_id)
    device = _device_of(model)
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    shown = [0] * len(generated)
    rows = range(len(generated))
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    for tokens, active in token_steps(model, input_ids.to(device), attention_mask, config, tokenizer, pad_id,
                                      prefill_inputs, strategy):
        for row in rows:
            if active[row]:
                generated[row].append(int(tokens[row]))
        deltas = []
        for row in rows:
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            safe = safe_prefix(text, config.stop_strings)
            deltas.append(safe[shown[row] :] if len(safe) > shown[row] else "")
            shown[row] = max(shown[row], len(safe))
        yield deltas
    # flush what was held back as a possible stop-string prefix once generation is over
    final = []
    for row in rows:
        text = cut_at_stop(tokenizer.decode(generated[row], skip_special_tokens=True), config.stop_strings)
        final.append(text[shown[row] :])
    if any(final):
        yield final


def safe_prefix(text: str, stop_strings: Sequence[str]) -> str:
    """The part of `text` that can be shown now: cut at a complete stop string, hold back a partial one at the end
    and a trailing replacement character (an incomplete multi-byte character)."""
    text = cut_at_stop(text, stop_strings)
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd")
