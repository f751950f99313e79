"""The one record type every benchmark reader produces, so tasks, metrics and reports never see a file format.

A reader turns a benchmark's files into `EvalSample`s in the file's order and counts every record it could not use
in a `SkipReport` (the same report the training datasets use; print `skipped.summary()` after reading).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.data.datasets import SkipReport


@dataclass
class EvalSample:
    id: str  # unique within one read; the benchmark's own id where it has one (VQAv2 question_id, GQA qid, ...)
    question: str  # the question as shown to the model: no image marker, no post-prompt
    image: Path | None  # absolute path, checked to exist (not decoded); None = text-only
    answers: list[str]  # references: VQAv2 all 10 annotator answers, captions all references, else one
    category: str = "all"  # reporting group: VQAv2 answer_type, GQA structural type, POPE split, MME subtask, ...
    choices: list[str] | None = None  # multiple-choice options in order (letters A, B, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # reader specifics: POPE label, MME image key, question_type


@dataclass
class ReadResult:
    samples: list[EvalSample]
    skipped: SkipReport  # every record that could not be used, with its reason

    def __len__(self) -> int:
        return len(self.samples)

    def categories(self) -> dict[str, int]:
        """Samples per category, in order of first appearance."""
        return dict(Counter(sample.category for sample in self.samples))
