"""Short-answer QA evaluation by exact match, per category, with the blind baseline beside it.

The blind baseline asks the same model the same questions with a blank (uniform grey) image of the same size: any
accuracy it reaches comes from the question text alone, so the gap between the two is what the model reads from
pixels. Used by the trainer's periodic eval and the quickstart report; the full harness (metrics per benchmark,
reports, plots) builds on it.
"""

from __future__ import annotations

import os
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from monovlm.data.images import ImageLoadError
from monovlm.data.processor import IMAGE_MARKER, Processor
from monovlm.infer.generate import GenerationConfig, generate

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: 'Top left.' == 'top left'."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (128, 128, 128))


def question_of(record: dict[str, Any]) -> str:
    """The first human turn without the image marker (what the model is asked)."""
    if "question" in record:
        return record["question"]
    first = next(t["value"] for t in record["conversations"] if t.get("from") in ("human", "user"))
    return first.replace(IMAGE_MARKER, "").strip()


def answer_of(record: dict[str, Any]) -> str:
    if "answer" in record:
        return record["answer"]
    return next(t["value"] for t in record["conversations"] if t.get("from") in ("gpt", "assistant"))


@torch.no_grad()
def answer(model, processor: Processor, questions: Sequence[str], images: Sequence[Image.Image | None],
           max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to a batch of (question, image) pairs; one batched generation."""
    prompts, tensors = [], []
    for question, image in zip(questions, images):
        ids, image_tensors = processor.prompt(question, [image] if image is not None else [])
        prompts.append(ids)
        tensors += image_tensors
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=processor.stop_ids)
    results = generate(model, prompts, config, processor.tokenizer, pad_id=processor.tokenizer.pad_id or 0,
                       prefill_inputs={"images": tensors} if tensors else None)
    return [r.text.strip() for r in results]


@dataclass
class QAResult:
    accuracy: dict[str, float]  # per category, plus "overall"
    counts: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def evaluate_qa(model, processor: Processor, records: Sequence[dict[str, Any]], image_root: str | os.PathLike,
                blank: bool = False, batch_size: int = 32, max_new_tokens: int = 8, progress: bool = False) -> QAResult:
    """Exact-match accuracy per `category` on LLaVA-style records with one image each (unreadable ones skipped)."""
    was_training = model.training
    model.eval()
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    predictions = []
    skipped = 0
    root = Path(image_root)
    bar = tqdm(total=len(records), desc="eval (blind)" if blank else "eval", disable=not progress, leave=False)
    for start in range(0, len(records), batch_size):
        chunk, images = [], []
        for record in records[start : start + batch_size]:
            try:
                image = processor.load(root / record["image"]) if record.get("image") else None
            except ImageLoadError:
                skipped += 1
                continue
            chunk.append(record)
            images.append(blank_like(image) if blank and image is not None else image)
        if chunk:
            outputs = answer(model, processor, [question_of(r) for r in chunk], images, max_new_tokens)
            for record, output in zip(chunk, outputs):
                category = record.get("category", "all")
                hit = normalize_answer(output) == normalize_answer(answer_of(record))
                correct[category] += hit
                total[category] += 1
                predictions.append({"id": record.get("id"), "category": category, "prediction": output,
                                    "answer": answer_of(record), "correct": hit})
        bar.update(len(records[start : start + batch_size]))
    bar.close()
    model.train(was_training)
    accuracy = {c: correct[c] / total[c] for c in sorted(total)}
    accuracy["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return QAResult(accuracy, dict(total), predictions, skipped)
