"""The model protocol every evaluator uses: generate, loglikelihood, next-token logits.

`ModelRunner` wraps any monovlm VLM folder (encoder-free, or the encoder-based baseline, which is the same class with
a ViT embedder) with its processor and answers three kinds of request, in batches, with left padding:

- `generate(queries, settings)`: the answer text of each (question, images) query;
- `loglikelihood(requests)`: the SUMMED log-probability of each continuation given its context (and whether greedy
  decoding would have produced it) — not the mean loss, which is positive and makes an argmax over options pick
  the worst one (the lmms-eval pitfall);
- `next_token_logits(queries)`: the logits (B, V) of the first answer token, for decoding-strategy research.

Token reduction and decoding strategies are options of the runner, so every task can be run with them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from monovlm.data.processor import Processor
from monovlm.infer.generate import GenerationConfig, generate, left_pad


@dataclass
class Query:
    """One question about zero or more images; `text` is the whole user turn (post-prompt included)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class LoglikelihoodRequest:
    """log p(continuation | context, images); the context is a user turn, the continuation the assistant's text."""

    context: str
    continuation: str
    images: list[Image.Image] = field(default_factory=list)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ModelRunner:
    """A monovlm VLM + its processor, answering the protocol's requests in batches of `batch_size`.

    `prefill_options` go to the model's prompt forward (e.g. `{"reduction": ...}` for visual token reduction);
    `strategy` is a decoding strategy for `generate` (see `monovlm.infer.decoding`)."""

    def __init__(self, model, processor: Processor, batch_size: int = 32, prefill_options: dict | None = None,
                 strategy=None, name: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.prefill_options = dict(prefill_options or {})
        self.strategy = strategy
        self.name = name or "model"
        self.pad_id = self.tokenizer.pad_id or 0

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
             **options) -> "ModelRunner":
        from monovlm.model.vlm import EncoderFreeVLM
        from monovlm.tokenizer import Tokenizer

        folder = Path(folder)
        model = EncoderFreeVLM.load(folder, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_folder(folder)
        processor = Processor(tokenizer, model.config.vision, model.config.processor)
        return cls(model, processor, name=options.pop("name", folder.name), **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_image(self, source) -> Image.Image:
        """The shared safe loader with this model's pixel limits (raises ImageLoadError)."""
        return self.processor.load(source)

    def _encode(self, queries: Sequence[Query]) -> tuple[list[list[int]], list[torch.Tensor]]:
        prompts, tensors = [], []
        for query in queries:
            ids, image_tensors = self.processor.prompt(query.text, query.images)
            prompts.append(ids)
            tensors += image_tensors
        return prompts, tensors

    def _prefill_inputs(self, tensors: list[torch.Tensor]) -> dict | None:
        inputs = dict(self.prefill_options)
        if tensors:
            inputs["images"] = [t.to(self.device) for t in tensors]
        return inputs or None

    # ---------------------------------------------------------------------------------------------------------------
    # the protocol

    @torch.inference_mode()
    def generate(self, queries: Sequence[Query], settings: GenerationConfig | None = None) -> list[str]:
        """Answer text per query (special tokens dropped, stripped), generated in batches with left padding."""
        settings = settings or GenerationConfig(max_new_tokens=16)
        if not settings.stop_ids:
            settings = _with_stop_ids(settings, self.processor.stop_ids)
        texts: list[str] = []
        for batch in chunks(queries, self.batch_size):
            prompts, tensors = self._encode(batch)
            extra = {"strategy": self.strategy} if self.strategy is not None else {}
            results = generate(self.model, prompts, settings, self.tokenizer, pad_id=self.pad_id,
                               prefill_inputs=self._prefill_inputs(tensors), **extra)
            texts += [r.text.strip() for r in results]
        return texts

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(sum of log p over the continuation's tokens, whether each of them is the argmax) per request."""
        scores: list[tuple[float, bool]] = []
        for batch in chunks(requests, self.batch_size):
            contexts, tensors = self._encode([Query(r.context, r.images) for r in batch])
            continuations = [self.tokenizer.encode(r.continuation) for r in batch]
            for row, continuation in enumerate(continuations):
                if not continuation:
                    raise ValueError(f"request {row}: the continuation {batch[row].continuation!r} has no tokens")
            input_ids, attention_mask = left_pad([c + t for c, t in zip(contexts, continuations)], self.pad_id)
            inputs = self._prefill_inputs(tensors) or {}
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                **inputs)  # (B, T, V)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            length = input_ids.shape[1]
            for row, continuation in enumerate(continuations):
                n = len(continuation)
                targets = input_ids[row, length - n :].to(self.device)  # (n,)
                predicted = log_probs[row, length - n - 1 : length - 1]  # (n, V): position t predicts token t+1
                picked = predicted.gather(1, targets[:, None]).squeeze(1)
                greedy = bool((predicted.argmax(-1) == targets).all())
                scores.append((float(picked.sum()), greedy))
        return scores

    @torch.inference_mode()
    def next_token_logits(self, queries: Sequence[Query]) -> torch.Tensor:
        """Logits (B, V) of the first answer token of each query (fp32, on the CPU)."""
        rows = []
        for batch in chunks(queries, self.batch_size):
            prompts, tensors = self._encode(batch)
            input_ids, attention_mask = left_pad(prompts, self.pad_id)
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                last_only=True, **(self._prefill_inputs(tensors) or {}))
            rows.append(logits[:, -1].float().cpu())
        return torch.cat(rows)


def _with_stop_ids(settings: GenerationConfig, stop_ids: Sequence[int]) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p, stop_ids=tuple(stop_ids),
                            stop_strings=settings.stop_strings, seed=settings.seed)
