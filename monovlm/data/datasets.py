"""LLaVA-format JSON / JSONL datasets that never stop a run for a bad sample and never lose one silently.

A record that cannot be used (malformed line, missing or corrupt image, image path escaping the root, too long, no
answer) becomes a `SkippedSample` naming the record and the reason. Collation drops skipped items and counts them in
a `SkipReport` that lives in the main process (so counts stay right with DataLoader workers), and the report's
`summary()` is printed at the end of every pass over the data.
"""

from __future__ import annotations

import bisect
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.data.images import ImageLoadError
from monovlm.data.processor import IMAGE_MARKER, ProcessedSample, Processor, SampleError


class DatasetError(ValueError):
    """The dataset file itself is unusable (missing, or not JSON at all): that does stop the run, by name."""


@dataclass
class SkippedSample:
    where: str  # "record 12 (id=abc)" or "line 7"
    reason: str  # a short category, e.g. "image unreadable"
    detail: str  # the full message


@dataclass
class SkipReport:
    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[SkippedSample] = field(default_factory=list)
    max_examples: int = 20

    def record(self, item: "ProcessedSample | SkippedSample | Any") -> bool:
        """Count one item (any sample type, or a SkippedSample); True if it is usable."""
        self.total += 1
        if isinstance(item, SkippedSample):
            self.reasons[item.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(item)
            return False
        return True

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"used all {self.total} samples"
        lines = [f"skipped {self.skipped} of {self.total} samples:"]
        lines += [f"  {count} × {reason}" for reason, count in self.reasons.most_common()]
        lines += [f"  - {item.where}: {item.detail}" for item in self.examples]
        if self.skipped > len(self.examples):
            lines.append(f"  ... and {self.skipped - len(self.examples)} more")
        return "\n".join(lines)


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[SkippedSample]]:
    """Records of a .json (a list) or .jsonl (one object per line) file, and the malformed ones as skips."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist" if not path.exists() else f"{path} is not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    records: list[dict[str, Any]] = []
    skipped: list[SkippedSample] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                skipped.append(SkippedSample(f"{path.name} line {number}", "malformed line", str(error)))
                continue
            if not isinstance(record, dict):
                skipped.append(SkippedSample(f"{path.name} line {number}", "malformed line", "not a JSON object"))
                continue
            records.append(record)
        return records, skipped
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); use .jsonl for line-by-line tolerance") from error
    if not isinstance(data, list):
        raise DatasetError(f"{path} must hold a JSON list of samples")
    for number, record in enumerate(data):
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(SkippedSample(f"{path.name} record {number}", "malformed record", "not a JSON object"))
    return records, skipped


def _reason(error: Exception) -> str:
    if isinstance(error, ImageLoadError):
        return "image unreadable"
    message = str(error)
    if "escapes the image root" in message:
        return "image path escapes root"
    if "max_length" in message:
        return "too long"
    return "invalid sample"


def merge_turns_by_image(records: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Merge the single-image records of one image into one multi-turn conversation, as LLaVA's instruction data is.

    A data set written one question per record (VQA-style, or monovlm's synthetic QA) then costs one pass over the
    image tokens per image instead of one per question: with ~4 questions per 64-token image that is ~2.5x more
    answer tokens per training FLOP. Records keep their first-appearance order. The question/answer pairs inside a
    merged record are put in a seeded random order per image: data files often list an image's questions in a fixed
    order (attribute first, ...), and a model trained on that order learns to answer the first turn by its category
    without reading it (tried: it then answered every single-turn eval question with a colour or a shape). The image
    marker goes on the first question only. Records with no image, several images or an image given as a list pass
    through unchanged, as does any record whose conversation is not (human, gpt) pairs.
    """
    merged: list[dict[str, Any]] = []
    by_image: dict[str, dict[str, Any]] = {}  # image -> its merged record (conversations filled in at the end)
    pairs_of: dict[str, list[tuple[str, str]]] = {}  # image -> its (question, answer) pairs
    for record in records:
        image, turns = record.get("image"), record.get("conversations")
        pairs = isinstance(turns, list) and len(turns) % 2 == 0 and all(
            isinstance(t, dict) and t.get("from") == ("human", "gpt")[i % 2] and isinstance(t.get("value"), str)
            for i, t in enumerate(turns))
        if not isinstance(image, str) or not pairs or not turns:
            merged.append(record)
            continue
        if image not in by_image:
            by_image[image] = {"id": record.get("id"), "image": image}
            pairs_of[image] = []
            merged.append(by_image[image])
        for question, answer in zip(turns[::2], turns[1::2]):
            pairs_of[image].append((question["value"].replace(IMAGE_MARKER, "").strip(), answer["value"]))
    for image, group in by_image.items():
        pairs = pairs_of[image]
        random.Random(f"{seed}:{image}").shuffle(pairs)
        group["conversations"] = [
            {"from": role, "value": (IMAGE_MARKER + "\n" + text) if i == 0 and role == "human" else text}
            for i, (question, answer) in enumerate(pairs) for role, text in (("human", question), ("gpt", answer))]
    return merged


class LlavaDataset:
    """Map-style dataset: item i is the processed record i, or a SkippedSample saying why it cannot be used.

    `group_by_image=True` first merges the records of each image into one multi-turn record (`merge_turns_by_image`)."""

    def __init__(self, path: str | os.PathLike, processor: Processor, image_root: str | os.PathLike | None = None,
                 group_by_image: bool = False, group_seed: int = 0):
        self.path = Path(path)
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.records, self.malformed = read_records(self.path)
        if group_by_image:
            self.records = merge_turns_by_image(self.records, seed=group_seed)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def name(self) -> str:  # what progress and error messages call this data
        return self.path.name

    def describe(self, index: int) -> str:
        record_id = self.records[index].get("id")
        return f"{self.path.name} record {index}" + (f" (id={record_id})" if record_id is not None else "")

    def __getitem__(self, index: int) -> ProcessedSample | SkippedSample:
        try:
            return self.processor.process(self.records[index], image_root=self.image_root)
        except (SampleError, ImageLoadError) as error:
            return SkippedSample(self.describe(index), _reason(error), str(error))

    def text_lengths(self) -> list[int]:
        """A cheap length estimate per record, for grouping batches by length: the characters of its conversation
        (no image is decoded, nothing is tokenized). Malformed conversations count 0 (the processor skips them)."""
        lengths = []
        for record in self.records:
            turns = record.get("conversations")
            values = [t.get("value") for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
            lengths.append(sum(len(v) for v in values if isinstance(v, str)))
        return lengths

    def new_report(self) -> SkipReport:
        """A report that already counts the file's malformed lines."""
        report = SkipReport()
        for item in self.malformed:
            report.record(item)
        return report

    def processed(self, report: SkipReport | None = None, indices: Sequence[int] | None = None) -> Iterator[ProcessedSample]:
        """Usable samples in order (or in the order of `indices`), counting skips into report."""
        report = report if report is not None else self.new_report()
        for index in indices if indices is not None else range(len(self)):
            item = self[index]
            if report.record(item):
                yield item  # type: ignore[misc]


class MixedDataset:
    """Several datasets read as one, each a whole number of times per epoch: a data mixture by repetition.

    Item i of the mixture is item j of one part, the parts laid end to end, a part with `repeat` r laid r times, so
    a seeded permutation of the mixture (the batch stream's) sees each sample of that part r times per epoch.
    Everything the batch stream asks of one dataset works the same (skips are counted per read, like a file read
    twice)."""

    def __init__(self, parts: Sequence[tuple[LlavaDataset, int]]):
        if not parts:
            raise ValueError("a data mixture needs at least one dataset")
        for dataset, repeat in parts:
            if not isinstance(repeat, int) or repeat < 1:
                raise ValueError(f"{dataset.name}: repeat must be a positive integer, got {repeat!r}")
        self.parts = list(parts)
        self.starts: list[int] = []  # first mixture index of each part
        total = 0
        for dataset, repeat in self.parts:
            self.starts.append(total)
            total += len(dataset) * repeat
        self.total = total

    def __len__(self) -> int:
        return self.total

    @property
    def name(self) -> str:  # "instruct_train.json ×2 + existence_train.json"
        return " + ".join(dataset.name + (f" ×{repeat}" if repeat > 1 else "") for dataset, repeat in self.parts)

    def locate(self, index: int) -> tuple[LlavaDataset, int]:
        """(the part, its record index) that mixture item `index` reads."""
        if not 0 <= index < self.total:
            raise IndexError(f"mixture index {index} out of range [0, {self.total})")
        part = bisect.bisect_right(self.starts, index) - 1  # the last part starting at or before index (empty ones skip)
        dataset = self.parts[part][0]
        return dataset, (index - self.starts[part]) % len(dataset)

    def describe(self, index: int) -> str:
        dataset, local = self.locate(index)
        return dataset.describe(local)

    def __getitem__(self, index: int) -> ProcessedSample | SkippedSample:
        dataset, local = self.locate(index)
        return dataset[local]

    def text_lengths(self) -> list[int]:
        return [length for dataset, repeat in self.parts for length in dataset.text_lengths() * repeat]

    def new_report(self) -> SkipReport:
        report = SkipReport()
        for dataset, _ in self.parts:
            for item in dataset.malformed:
                report.record(item)
        return report

    processed = LlavaDataset.processed


def skipping_collate(collate_fn: Callable, report: SkipReport) -> Callable:
    """Wrap a collate function: drop and count SkippedSamples (runs in the main process), collate the rest."""

    def collate(items: list) -> Any:
        usable = [item for item in items if report.record(item)]
        return collate_fn(usable) if usable else None

    return collate
