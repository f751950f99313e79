"""Short-answer QA on LLaVA-style records, per category, with the blind baseline beside it — the trainer's periodic
eval and the quickstart's report.

It runs the shipped `synthetic` task of the harness (same prompt, extraction, metric and generation settings) on
records already in memory, so the trainer's numbers and `monovlm eval --tasks synthetic` agree exactly on the same
data. The blind baseline asks the same questions with a uniform grey image of the same size: any accuracy it reaches
comes from the question text alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from monovlm.data.datasets import SkippedSample, SkipReport
from monovlm.data.images import ImagePathError, image_path_under
from monovlm.data.processor import IMAGE_MARKER, Processor
from monovlm.eval.harness import OVERALL, blank_like, run_task
from monovlm.eval.metrics import answer_type
from monovlm.eval.protocol import ModelRunner, Query
from monovlm.eval.samples import EvalSample
from monovlm.eval.tasks import load_task
from monovlm.infer.generate import GenerationConfig

__all__ = ["BlindGap", "QAResult", "answer", "answer_of", "blank_like", "blind_gaps", "evaluate_qa", "question_of",
           "samples_from_records", "yes_no_groups"]


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


def samples_from_records(records: Sequence[dict[str, Any]], image_root: str | os.PathLike,
                         skipped: SkipReport | None = None) -> list[EvalSample]:
    """Eval samples grouped by the records' `category`, or, where a record has none, by its answer's VQAv2 answer
    type (yes/no, number, other). An image path is resolved by the readers' one rule (`images.image_path_under`:
    inside the image root, links resolved); a record whose path breaks it is left out, counted in `skipped`."""
    root = Path(image_root)
    samples = []
    for index, record in enumerate(records):
        image = None
        if record.get("image"):
            try:
                image = image_path_under(root, record["image"])
            except ImagePathError as error:
                if skipped is not None:
                    skipped.record(SkippedSample(f"record {index}", "image path escapes root", str(error)))
                continue
        samples.append(EvalSample(id=str(record.get("id", index)), question=question_of(record),
                                  answers=[answer_of(record)], image=image,
                                  category=record.get("category") or answer_type(answer_of(record))))
    return samples


def yes_no_groups(records: Sequence[dict[str, Any]]) -> set[str]:
    """The answer groups (as `samples_from_records` forms them) whose every answer is yes or no."""
    groups: dict[str, bool] = {}
    for record in records:
        kind = answer_type(answer_of(record))
        group = record.get("category") or kind
        groups[group] = groups.get(group, True) and kind == "yes/no"
    return {group for group, all_yes_no in groups.items() if all_yes_no}


@torch.no_grad()
def answer(model, processor: Processor, questions: Sequence[str], images: Sequence[Image.Image | None],
           max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to a batch of (question, image) pairs; one batched generation."""
    runner = ModelRunner(model, processor, batch_size=max(1, len(questions)))
    queries = [Query(q, [i] if i is not None else []) for q, i in zip(questions, images)]
    return runner.generate(queries, GenerationConfig(max_new_tokens=max_new_tokens))


@dataclass
class QAResult:
    accuracy: dict[str, float]  # per category, plus "overall"
    counts: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def evaluate_qa(model, processor: Processor, records: Sequence[dict[str, Any]], image_root: str | os.PathLike,
                blank: bool = False, batch_size: int = 32, progress: bool = False) -> QAResult:
    """Exact-match accuracy per `category` (unreadable images skipped and counted), through the `synthetic` task."""
    was_training = model.training
    runner = ModelRunner(model, processor, batch_size=batch_size)
    skipped = SkipReport()
    try:
        result = run_task(runner, load_task("synthetic"), samples_from_records(records, image_root, skipped),
                          blank=blank, skipped=skipped, progress=progress)
    finally:
        model.train(was_training)
    accuracy = {group: values["accuracy"] for group, values in result.scores.items() if group != OVERALL}
    accuracy[OVERALL] = result.scores[OVERALL]["accuracy"]
    counts = {group: n for group, n in result.counts.items() if group != OVERALL}
    return QAResult(accuracy, counts, result.predictions, result.skipped)


@dataclass
class BlindGap:
    """One answer group's accuracy with the image and with a blank one, on the same questions."""

    group: str
    questions: int
    model: float
    blind: float
    same_answers: float  # share of questions answered exactly as with the blank image
    noise: float  # two standard errors of the paired accuracy difference (model minus blind, question by question)

    @property
    def looks(self) -> bool:
        """The image raises the accuracy by more than noise (and by at least one point)."""
        return self.model - self.blind > max(self.noise, 0.01)

    def line(self, trained: bool = True) -> str:
        """One log line; `trained=False` for a type the stage does not train (no plateau to warn of)."""
        if not trained:
            verdict = "  (not trained in this stage)"
        else:
            verdict = "" if self.looks else "  <- at blind: answers from the wording alone"
        return (f"{self.group:<12} {self.questions:>5}  model {100 * self.model:5.1f}%  "
                f"blind {100 * self.blind:5.1f}%  (±{100 * self.noise:.1f})  "
                f"same answer as blind {100 * self.same_answers:5.1f}%{verdict}")


def blind_gaps(model_result: QAResult, blind_result: QAResult) -> list[BlindGap]:
    """Per answer group (category, else answer type) of an `evaluate_qa` run and its `blank=True` twin: model vs
    blind accuracy, the noise of their difference, and how often the two answers agree. An answer group within noise
    of blind is one the model answers from the question's wording: the plateau a model that does not look sits on."""
    blind_by_id = {p["id"]: p for p in blind_result.predictions}
    gaps = []
    for group in sorted(model_result.counts):
        pairs = [(p, blind_by_id[p["id"]]) for p in model_result.predictions
                 if p["group"] == group and p["id"] in blind_by_id]
        n = max(len(pairs), 1)
        differences = [m["score"] - b["score"] for m, b in pairs]  # per question: 1, 0 or -1 for exact match
        mean = sum(differences) / n
        variance = max(sum(d * d for d in differences) / n - mean * mean, 0.0)
        same = sum(m["prediction"] == b["prediction"] for m, b in pairs) / n
        gaps.append(BlindGap(group, len(pairs), sum(m["score"] for m, _ in pairs) / n,
                             sum(b["score"] for _, b in pairs) / n, same, 2 * (variance / n) ** 0.5))
    return gaps
