"""LLaVA-format JSON / JSONL datasets that never stop a run for a bad sample and never lose one silently.

A record that cannot be used (malformed line, missing or corrupt image, image path escaping the root, too long, no
answer) becomes a `SkippedSample` naming the record and the reason. Collation drops skipped items and counts them in
a `SkipReport` that lives in the main process (so counts stay right with DataLoader workers), and the report's
`summary()` is printed at the end of every pass over the data.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import random
import re
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.data.images import (
    ImageLoadError,
    image_header_size,
    image_path_under,
    max_image_tokens,
    num_image_tokens,
)
from monovlm.data.processor import (IGNORE_INDEX, IMAGE_MARKER, ProcessedSample, Processor, SampleError,
                                    has_lone_surrogate)


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


_UTF8_BOM = b"\xef\xbb\xbf"  # some editors start UTF-8 files with it; JSON readers must not see it
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate (paired or lone)


class _TooLongNumber:
    """What the JSON reader makes of an integer longer than Python converts, so the record holding it is skipped
    rather than the whole file failing."""


_TOO_LONG = _TooLongNumber()


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[SkippedSample]]:
    """Records of a .json (a list) or .jsonl (one object per line) file, and the unusable ones as skips.

    A record is skipped, by line (.jsonl) or index (.json) and reason, when it is not a JSON object, is not JSON
    (.jsonl), holds bytes that are not UTF-8 or a lone surrogate escape ("invalid UTF-8": text no tokenizer takes), or
    holds an integer longer than Python reads ("number too long", over `sys.get_int_max_str_digits()`). Only a .json
    file that is not a JSON list at all stops the run, as a `DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist" if not path.exists() else f"{path} is not a file")
    data = path.read_bytes().removeprefix(_UTF8_BOM)
    if path.suffix == ".jsonl":
        return _read_lines(data, path.name)
    try:
        text, undecodable = data.decode("utf-8"), False
    except UnicodeDecodeError:  # the records holding such bytes are skipped below, not the file
        text, undecodable = data.decode("utf-8", errors="surrogateescape"), True
    try:
        values, huge = _parse_json(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); use .jsonl for line-by-line tolerance") from error
    except RecursionError as error:
        raise DatasetError(f"{path} nests JSON deeper than Python's reader allows; use .jsonl for line-by-line "
                           "tolerance") from error
    if not isinstance(values, list):
        raise DatasetError(f"{path} must hold a JSON list of samples")
    check = undecodable or huge or _may_hold_surrogates(text)  # else no record can hold a text fault: skip the walk
    records: list[dict[str, Any]] = []
    skipped: list[SkippedSample] = []
    for number, record in enumerate(values):
        where = f"{path.name} record {number}"
        fault = _text_fault(record) if check else None
        if fault is not None:
            skipped.append(SkippedSample(_with_id(where, record), *fault))
        elif not isinstance(record, dict):
            skipped.append(SkippedSample(where, "malformed record", "not a JSON object"))
        else:
            records.append(record)
    return records, skipped


def _parse_int(digits: str) -> int | _TooLongNumber:
    try:
        return int(digits)
    except ValueError:  # over Python's int-string limit (4,300 digits by default)
        return _TOO_LONG


def _parse_json(text: str) -> tuple[Any, bool]:
    """json.loads(text), and whether an integer in it was too long for Python (it is then `_TOO_LONG`). The hook
    only runs on a second parse, after the fast one failed on such a number. Raises JSONDecodeError, RecursionError."""
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        raise
    except ValueError:  # json.loads raises a plain ValueError for an integer over the int-string limit
        return json.loads(text, parse_int=_parse_int), True


def _may_hold_surrogates(text: str) -> bool:
    return "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None


def _text_fault(value: Any) -> tuple[str, str] | None:
    """(reason, detail) if a parsed JSON value holds a too-long integer or a lone surrogate, else None. Iterative:
    a value nested as deep as the JSON reader allows must not overflow the stack here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is _TOO_LONG:
            return "number too long", (f"an integer has more than {sys.get_int_max_str_digits()} digits, more than "
                                       "Python reads (sys.set_int_max_str_digits)")
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return "invalid UTF-8", ("a string holds bytes that are not UTF-8 or a lone surrogate escape "
                                         "(\\ud800-\\udfff), which is not text")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _with_id(where: str, record: Any) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(record_id, (str, int)) and _text_fault(record_id) is None:
        return f"{where} (id={record_id})"
    return where


def _read_lines(data: bytes, name: str) -> tuple[list[dict[str, Any]], list[SkippedSample]]:
    """The records of a .jsonl file's bytes, one per non-blank line; each unusable line a skip naming it."""
    records: list[dict[str, Any]] = []
    skipped: list[SkippedSample] = []
    # bytes split only at \n, \r\n and \r: str.splitlines would also split at U+2028 and the like, which may stand
    # unescaped inside a JSON string
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        item = _parse_line(raw, f"{name} line {number}")
        (skipped if isinstance(item, SkippedSample) else records).append(item)
    return records, skipped


def _parse_line(raw: bytes, where: str) -> dict[str, Any] | SkippedSample:
    """One .jsonl line -> its record, or a skip saying why it is unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return SkippedSample(where, "invalid UTF-8", f"byte {error.start + 1} of the line is not UTF-8 ({error.reason})")
    try:
        record, huge = _parse_json(line)
    except json.JSONDecodeError as error:
        return SkippedSample(where, "malformed line", str(error))
    except RecursionError:
        return SkippedSample(where, "malformed line", "nested deeper than Python's JSON reader allows")
    if not isinstance(record, dict):
        return SkippedSample(where, "malformed line", "not a JSON object")
    fault = _text_fault(record) if huge or _may_hold_surrogates(line) else None
    return SkippedSample(where, *fault) if fault is not None else record


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # what bytes.splitlines splits at (not U+2028, which JSON may hold)
_LINE = re.compile(rb"[^\r\n]+")


class JsonlIndex(Sequence):
    """The records of a .jsonl file, read on demand through a byte-offset index: what stays in memory per record is
    its line's start and end (16 bytes) and line number, not the record, so a file of tens of millions of samples
    fits. Item i is the i-th non-blank line's record, parsed when asked for, or a `SkippedSample` naming the line
    when it is unusable (the same reasons as `read_records`). Each process opens the file for itself, so data
    workers started by fork or spawn read it safely. The file must not change while it is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"dataset file {self.path} does not exist" if not self.path.exists()
                               else f"{self.path} is not a file")
        self.starts, self.ends, self.numbers = array("q"), array("q"), array("q")
        self._file: int | None = None  # a descriptor of this process (`_pid`)
        self._pid: int | None = None
        with open(self.path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                skip = len(_UTF8_BOM) if data[:len(_UTF8_BOM)] == _UTF8_BOM else 0
                number, previous_end = 1, skip
                for match in _LINE.finditer(data, skip):
                    number += len(_LINE_BREAK.findall(data, previous_end, match.start()))
                    previous_end = match.end()
                    if match.group().strip():
                        self.starts.append(match.start())
                        self.ends.append(match.end())
                        self.numbers.append(number)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path.name} has {len(self)} records, no record {index}")
        if self._file is None or self._pid != os.getpid():  # a worker process opens its own descriptor
            self._file, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, size = self.starts[index], self.ends[index] - self.starts[index]
        raw = b""
        while len(raw) < size:  # pread: no shared file position, no stale buffer
            chunk = os.pread(self._file, size - len(raw), start + len(raw))
            if not chunk:
                raise DatasetError(f"{self.path} is shorter than when it was indexed: it changed while being read")
            raw += chunk
        return _parse_line(raw, f"{self.path.name} line {self.numbers[index]}")

    def __getstate__(self) -> dict[str, Any]:  # a descriptor means nothing in another process: reopen there
        return {**self.__dict__, "_file": None, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None and self._pid == os.getpid():
            os.close(self._file)


def skip_reason(error: Exception) -> str:
    """The short category a skip report counts a sample's error under."""
    if isinstance(error, ImageLoadError):
        return "image path invalid" if "is not a usable path" in error.reason else "image unreadable"
    message = str(error)
    if "escapes the image root" in message:
        return "image path escapes root"
    if "cannot be resolved" in message:
        return "image path invalid"
    if "max_length" in message:
        return "too long"
    if "lone surrogate" in message:
        return "invalid UTF-8"
    if f"{IMAGE_MARKER} markers" in message:
        return "image marker count"
    return "invalid sample"


def merge_turns_by_image(records: Sequence[dict[str, Any]], seed: int = 0,
                         fits: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """Merge the single-image records of one image into one multi-turn conversation, as LLaVA's instruction data is.

    A data set written one question per record (VQA-style, or monovlm's synthetic QA) then costs one pass over the
    image tokens per image instead of one per question: with ~4 questions per 64-token image that is ~2.5x more
    answer tokens per training FLOP. Records keep their first-appearance order. The question/answer pairs inside a
    merged record are put in a seeded random order per image: data files often list an image's questions in a fixed
    order (attribute first, ...), and a model trained on that order learns to answer the first turn by its category
    without reading it (tried: it then answered every single-turn eval question with a colour or a shape). The image
    marker goes on the first question only.

    Only a record merging cannot change is merged: one image given as a string, a conversation of (human, gpt) pairs,
    and at most one image marker, in a question. Any other record passes through unchanged (no image, several
    images, other speakers, or two markers for one image, which the processor then skips by the record's own name
    instead of the merge quietly dropping a marker, or carrying one in an answer into the merged conversation).

    `fits(record)` says whether a record stays within the processor's max_length. Given, a merged conversation that
    does not fit is split rather than lost whole: a record too long on its own passes through unchanged (the processor
    skips it alone, as too long), and the others' pairs, in their seeded order, are cut into consecutive
    conversations that each fit. A group that fits is merged exactly as without `fits`.
    """
    slots: list[list[dict[str, Any]] | str] = []  # a passed-through record, or the image whose group goes there
    groups: dict[str, list[dict[str, Any]]] = {}  # image -> its records to merge, in order
    for record in records:
        image = record.get("image")
        if not isinstance(image, str) or not _mergeable(record.get("conversations")):
            slots.append([record])
            continue
        if image not in groups:
            groups[image] = []
            slots.append(image)
        groups[image].append(record)
    merged: list[dict[str, Any]] = []
    for slot in slots:
        merged += _merge_group(slot, groups[slot], seed, fits) if isinstance(slot, str) else slot
    return merged


def _mergeable(turns: Any) -> bool:
    """(human, gpt) pairs of strings with at most one image marker, in a question."""
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return False
    if not all(isinstance(t, dict) and t.get("from") == ("human", "gpt")[i % 2] and isinstance(t.get("value"), str)
               for i, t in enumerate(turns)):
        return False
    markers = [turn["value"].count(IMAGE_MARKER) for turn in turns]
    return sum(markers) <= 1 and sum(markers[1::2]) == 0


def _merge_group(image: str, group: list[dict[str, Any]], seed: int,
                 fits: Callable[[dict[str, Any]], bool] | None) -> list[dict[str, Any]]:
    """One image's records as one conversation or, where that does not fit, as several (see merge_turns_by_image)."""
    record_id = group[0].get("id")
    whole = _conversation(record_id, image, _shuffled_pairs(group, image, seed))
    if fits is None or fits(whole):
        return [whole]
    too_long = [not fits(record) for record in group]
    chunks: list[list[tuple[str, str]]] = []
    for pair in _shuffled_pairs([r for r, long in zip(group, too_long) if not long], image, seed):
        if chunks and fits(_conversation(record_id, image, chunks[-1] + [pair])):
            chunks[-1].append(pair)
        else:
            chunks.append([pair])  # alone it fits, as its record does (else the processor skips it as too long)
    return [_conversation(record_id, image, chunk) for chunk in chunks] + \
        [record for record, long in zip(group, too_long) if long]


def _shuffled_pairs(group: list[dict[str, Any]], image: str, seed: int) -> list[tuple[str, str]]:
    pairs = [(question["value"].replace(IMAGE_MARKER, "").strip(), answer["value"])
             for record in group for question, answer in zip(record["conversations"][::2],
                                                             record["conversations"][1::2])]
    random.Random(f"{seed}:{image}").shuffle(pairs)
    return pairs


def _conversation(record_id: Any, image: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return {"id": record_id, "image": image, "conversations": [
        {"from": role, "value": (IMAGE_MARKER + "\n" + text) if i == 0 and role == "human" else text}
        for i, (question, answer) in enumerate(pairs) for role, text in (("human", question), ("gpt", answer))]}


def length_check(processor: Processor,
                 header_size: Callable[[str], tuple[int, int]]) -> Callable[[dict[str, Any]], bool]:
    """fits(record) for `merge_turns_by_image`: whether the processor's tokens for a record of one image stay within
    its max_length, measured without decoding the image. The text is tokenized exactly; the image counts as the most
    visual tokens any image can take, and only when that would not fit is its header read (`header_size(name)` ->
    (height, width); both orientations' counts taken, the larger: EXIF rotation is not read). A record that cannot be
    measured (its image missing, its conversation refused) counts as fitting: the processor names its fault when it
    reads it."""
    limit = processor.config.max_length
    most = max_image_tokens(processor.vision)
    image_tokens: dict[str, int] = {}  # image name -> its visual tokens, read once per image

    def tokens_of(name: str) -> int:
        if name not in image_tokens:
            height, width = header_size(name)
            image_tokens[name] = max(num_image_tokens(height, width, processor.vision),
                                     num_image_tokens(width, height, processor.vision))
        return image_tokens[name]

    def fits(record: dict[str, Any]) -> bool:
        try:
            if processor.token_count(record, [most]) <= limit:
                return True
            return processor.token_count(record, [tokens_of(record["image"])]) <= limit
        except ValueError:  # SampleError, ImageLoadError, ImagePathError: the processor's to report
            return True

    return fits


class LlavaDataset:
    """Map-style dataset: item i is the processed record i, or a SkippedSample saying why it cannot be used.

    `select(records)` (e.g. only the yes/no questions) runs on the file's records first, and `label` then says in the
    data's name which of them this is. `group_by_image=True` then merges the records of each image into one multi-turn
    record (`merge_turns_by_image`). `reply_weights` (a `monovlm.data.yes_no.WordingBalance`), when given, sets each
    sample's per-token loss weights from its replies. `isolate_turns` lays each merged conversation out as turns that
    do not see each other (`Processor.isolated_turns`). A .jsonl file read as it is (no select, no grouping) is read on
    demand (`JsonlIndex`): its bad lines are then counted as skips when read, not all at the start."""

    def __init__(self, path: str | os.PathLike, processor: Processor, image_root: str | os.PathLike | None = None,
                 group_by_image: bool = False, group_seed: int = 0,
                 select: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                 label: str | None = None, reply_weights: Any = None, isolate_turns: bool = False):
        self.path = Path(path)
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.label = label
        self.reply_weights = reply_weights
        self.isolate_turns = isolate_turns
        self.records: Sequence[dict[str, Any]] | JsonlIndex
        if self.path.suffix == ".jsonl" and select is None and not group_by_image:
            # read on demand: memory per record is an offset; a bad line is a skip when it is read
            self.records, self.malformed = JsonlIndex(self.path), []
            return
        self.records, self.malformed = read_records(self.path)
        if select is not None:
            self.records = select(self.records)
        if group_by_image:
            self.records = merge_turns_by_image(self.records, seed=group_seed,
                                                fits=length_check(processor, self._header_size))

    def _header_size(self, name: str) -> tuple[int, int]:
        return image_header_size(image_path_under(self.image_root, name))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def name(self) -> str:  # what progress and error messages call this data
        return self.path.name + (f" ({self.label})" if self.label else "")

    def describe(self, index: int) -> str:
        record = self.records[index]
        if isinstance(record, SkippedSample):
            return record.where
        record_id = record.get("id")
        return f"{self.path.name} record {index}" + (f" (id={record_id})" if record_id is not None else "")

    def __getitem__(self, index: int) -> ProcessedSample | SkippedSample:
        record = self.records[index]
        if isinstance(record, SkippedSample):  # a bad line of a file read on demand
            return record
        try:
            sample = self.processor.process(record, image_root=self.image_root, isolate_turns=self.isolate_turns)
        except (SampleError, ImageLoadError) as error:
            return SkippedSample(self.describe(index), skip_reason(error), str(error))
        if self.reply_weights is not None:
            sample.label_weights = self.reply_weights.label_weights(sample.labels, record, IGNORE_INDEX)
        return sample

    def text_lengths(self) -> list[int]:
        """A cheap length estimate per record, for grouping batches by length: the characters of its conversation
        (no image is decoded, nothing is tokenized). Malformed conversations count 0 (the processor skips them)."""
        lengths = []
        for record in self.records:
            turns = record.get("conversations") if isinstance(record, dict) else None
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
    def name(self) -> str:  # "instruct.json ×2 + existence_train.json"
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
