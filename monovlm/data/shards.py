"""WebDataset shard folders: a LLaVA data file's records and image bytes in standard tar shards, read by index.

A folder that `write_shards` (`monovlm data shard`) writes:

    shard-000000.tar, shard-000001.tar, ...   WebDataset tars. Per sample, grouped under one key (its number in the
                                              folder, 9 digits): `KEY.json`, the record (the source file's JSON value),
                                              then its images' original file bytes: `KEY.EXT` for an "image" string,
                                              `KEY.I.EXT` for the I-th of an image list (EXT: the file's suffix)
    shards.json                               the shard list with sample counts, in wids' index format; written last,
                                              so a folder without it is not a finished one

The record keeps its image names: they are the keys teachers' precomputed features use and the names
`group_by_image` merges by. Any WebDataset reader reads the tars (`webdataset.WebDataset(urls)` gives a dict per
sample with "json" and the image extensions); monovlm reads them by position instead (`ShardIndex`: the tar headers
are scanned once into an offset index), so item i of a folder is the i-th record kept, in the source file's order,
and the trainer's seeded order, DDP sharding and resume apply unchanged.

A record whose image is unusable at shard time (missing, not an image by its header, a path that leaves the image
root, a malformed image entry) is left out, and so is a record the readers skip as malformed; shards.json lists each
with its reason, and a dataset over the folder counts them as skipped. With nothing left out but malformed records,
item i of the folder is item i of the source file, so training reads the same samples in the same order.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from monovlm.data.datasets import (DatasetError, LlavaDataset, SkippedSample, length_check, merge_turns_by_image,
                                   read_records, skip_reason)
from monovlm.data.images import ImageLoadError, ImagePathError, image_path_under, load_image, open_header
from monovlm.data.processor import IGNORE_INDEX, ProcessedSample, Processor, SampleError

INDEX = "shards.json"
INDEX_KIND = "wids-shard-index-v1"  # wids' ShardListDataset reads this index as it is
_SHARD = "shard-{:06d}.tar"
_KEY_DIGITS = 9
_SUFFIX = re.compile(r"[a-z0-9]+")


def is_shard_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished shard folder (a folder holding shards.json)."""
    path = Path(path)
    return path.is_dir() and (path / INDEX).is_file()


def is_data_source(path: str | os.PathLike) -> bool:
    """Whether a stage can read `path`: a data file, or a finished shard folder."""
    return Path(path).is_file() or is_shard_folder(path)


# ---------------------------------------------------------------------------------------------------------------------
# the member names of a record's images


def image_names(record: dict[str, Any]) -> list[str]:
    """The image names a record gives (its "image" or "images" entry), as the processor reads them; SampleError if
    the entry is malformed."""
    entry = record.get("image", record.get("images"))
    if entry is None:
        return []
    names = [entry] if isinstance(entry, str) else entry
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SampleError("'image' must be a path string or a list of path strings")
    return list(names)


def image_extensions(record: dict[str, Any]) -> list[str]:
    """The member extensions (after `KEY.`) of a record's images, in order: "png" for an "image" string, "0.png",
    "1.jpg", ... for a list. A suffix that is not plain letters and digits becomes "img" (the loader reads the
    format from the bytes, not the name)."""
    names = image_names(record)
    entry = record.get("image", record.get("images"))
    suffixes = [_suffix(name) for name in names]
    if isinstance(entry, str):
        return suffixes
    return [f"{number}.{suffix}" for number, suffix in enumerate(suffixes)]


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower().removeprefix(".")
    return suffix if _SUFFIX.fullmatch(suffix) else "img"


# ---------------------------------------------------------------------------------------------------------------------
# writing


@dataclass
class ShardSummary:
    samples: int = 0
    shards: int = 0
    skipped: list[SkippedSample] = field(default_factory=list)

    def line(self, out: Path) -> str:
        text = f"wrote {self.samples} samples in {self.shards} shard(s) to {out}"
        if not self.skipped:
            return text + "; skipped none"
        reasons = Counter(item.reason for item in self.skipped)
        return text + f"; skipped {len(self.skipped)}: " + ", ".join(f"{n} × {r}" for r, n in reasons.most_common())


class _ShardWriter:
    """One tar at a time, written as NAME.partial and renamed when complete: a crash leaves no whole-looking tar."""

    def __init__(self, out: Path, samples_per_shard: int):
        self.out = out
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []  # wids' shardlist entries of the finished tars
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            name = _SHARD.format(len(self.shards))
            self._tar = tarfile.open(self.out / (name + ".partial"), "w", format=tarfile.USTAR_FORMAT)
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same input, the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.samples_per_shard:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = _SHARD.format(len(self.shards))
        os.replace(self.out / (name + ".partial"), self.out / name)
        self.shards.append({"url": name, "nsamples": self._count, "filesize": (self.out / name).stat().st_size})
        self._tar, self._count = None, 0


def write_shards(source: str | os.PathLike, out: str | os.PathLike, samples_per_shard: int = 10_000,
                 image_root: str | os.PathLike | None = None, progress: bool = True) -> ShardSummary:
    """Write the records of a LLaVA .json/.jsonl file and their images' bytes as a shard folder `out` (see the
    module's docstring). Image names resolve under `image_root` (default: the file's folder) by the datasets' rule.
    `out` must not exist or be empty."""
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; shards go into a new folder")
    records, skipped = read_records(source)
    root = Path(image_root) if image_root is not None else source.parent
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, samples_per_shard)
    summary = ShardSummary(skipped=list(skipped))
    for number, record in enumerate(tqdm(records, desc=f"shard {source.name}", unit="record", disable=not progress)):
        members = _sample_members(record, root, f"{source.name} record {number}")
        if isinstance(members, SkippedSample):
            summary.skipped.append(members)
            continue
        writer.add(f"{summary.samples:0{_KEY_DIGITS}d}", members)
        summary.samples += 1
    writer.close()
    summary.shards = len(writer.shards)
    _write_index(out, source, writer.shards, summary)
    return summary


def _sample_members(record: dict[str, Any], root: Path, where: str) -> list[tuple[str, bytes]] | SkippedSample:
    """(extension, bytes) of a record's members, its JSON first; a SkippedSample if an image is unusable. The image
    is read, and its header checked, not decoded: decoding is the safe loader's, at training time."""
    where = where + (f" (id={record['id']})" if isinstance(record.get("id"), (str, int)) else "")
    try:
        names, extensions = image_names(record), image_extensions(record)
    except SampleError as error:
        return SkippedSample(where, "malformed image entry", str(error))
    members = [("json", json.dumps(record, ensure_ascii=False).encode("utf-8"))]
    for name, extension in zip(names, extensions):
        try:
            path = image_path_under(root, name)
            data = _image_bytes(path, repr(name))
        except ImagePathError as error:
            reason = "image path invalid" if "cannot be resolved" in str(error) else "image path escapes root"
            return SkippedSample(where, reason, str(error))
        except ImageLoadError as error:
            return SkippedSample(where, skip_reason(error), str(error))
        members.append((extension, data))
    return members


def _image_bytes(path: Path, label: str) -> bytes:
    """An image file's bytes, if its header reads as an image's (ImageLoadError naming `label` if not)."""
    if not path.is_file():
        raise ImageLoadError(f"{label} ({path})", "does not exist" if not path.exists() else "is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageLoadError(f"{label} ({path})", f"cannot be read ({error.strerror or error})") from error
    _header_size(data, f"{label} ({path})")
    return data


def _header_size(data: bytes, label: str) -> tuple[int, int]:
    """(height, width) as the image bytes' header declares them; ImageLoadError where the safe loader would fail on
    the header."""
    if not data:
        raise ImageLoadError(label, "is empty (0 bytes)")
    with open_header(io.BytesIO(data), data[:16], label) as image:
        width, height = image.size
    return height, width


def _write_index(out: Path, source: Path, shards: list[dict[str, Any]], summary: ShardSummary) -> None:
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": source.name, "shardlist": shards,
             "monovlm": {"source": source.name, "samples": summary.samples,
                         "skipped": [[item.where, item.reason, item.detail] for item in summary.skipped]}}
    partial = out / (INDEX + ".partial")
    partial.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    os.replace(partial, out / INDEX)  # last: the folder is finished when shards.json appears


# ---------------------------------------------------------------------------------------------------------------------
# reading by index


class ShardIndex(Sequence):
    """The records of a shard folder, read on demand through an offset index of its tars' members.

    The tar headers are scanned once (no member is read), each sample's members kept as offsets: item i is the i-th
    sample's record, parsed when asked for, or a SkippedSample naming it if its JSON member is unusable. Each
    process opens the tars for itself (data workers started by fork or spawn read them safely). A tar that holds
    other sample counts than shards.json says, or ends inside a member, is a DatasetError naming it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = _read_index(self.folder)
        self.shards: list[str] = [entry["url"] for entry in index["shardlist"]]
        self.skipped = [SkippedSample(*item) for item in index.get("monovlm", {}).get("skipped", [])]
        self.sample_shard = array("i")  # per sample: its tar
        self.sample_members = array("q", [0])  # per sample: its members are [members[i], members[i + 1])
        self.member_offsets, self.member_sizes = array("q"), array("q")
        self.member_extensions: list[str] = []  # interned: a few distinct strings, a reference per member
        for number, entry in enumerate(index["shardlist"]):
            self._scan(number, entry["nsamples"])
        self._files: dict[int, int] = {}  # tar number -> descriptor of this process (`_pid`)
        self._pid: int | None = None

    def _scan(self, number: int, expected: int) -> None:
        path = self.folder / self.shards[number]
        before, last_key = len(self), None
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    if info.offset_data + info.size > size:
                        raise DatasetError(f"shard {path} ends inside its member {info.name} (truncated?); "
                                           "write the folder again")
                    folder, _, name = info.name.rpartition("/")
                    key, _, extension = name.partition(".")  # WebDataset's rule: the key ends at the first dot
                    key = folder + "/" + key
                    if key != last_key:  # a sample's members are consecutive, as WebDataset groups them
                        last_key = key
                        self.sample_shard.append(number)
                        self.sample_members.append(self.sample_members[-1])
                    self.member_offsets.append(info.offset_data)
                    self.member_sizes.append(info.size)
                    self.member_extensions.append(sys.intern(extension))
                    self.sample_members[-1] += 1
        except FileNotFoundError:
            raise DatasetError(f"shard {path}, listed in {self.folder / INDEX}, does not exist") from None
        except tarfile.TarError as error:
            raise DatasetError(f"shard {path} is not a readable tar ({error}); write the folder again") from error
        found = len(self) - before
        if found != expected:
            raise DatasetError(f"shard {path} holds {found} samples, {self.folder / INDEX} says {expected} "
                               "(truncated or changed?); write the folder again")

    def __len__(self) -> int:
        return len(self.sample_shard)

    def where(self, index: int) -> str:
        return f"{self.folder.name}/{self.shards[self.sample_shard[index]]} sample {index}"

    def slot(self, index: int, extension: str) -> int | None:
        """The member number of sample `index`'s KEY.extension; None if it has none."""
        for slot in range(self.sample_members[index], self.sample_members[index + 1]):
            if self.member_extensions[slot] == extension:
                return slot
        return None

    def member(self, index: int, extension: str) -> bytes | None:
        """The bytes of sample `index`'s member KEY.extension; None if it has none."""
        slot = self.slot(index, extension)
        if slot is None:
            return None
        return self._read(self.sample_shard[index], self.member_offsets[slot], self.member_sizes[slot])

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.folder.name} has {len(self)} samples, no sample {index}")
        index %= len(self)
        data = self.member(index, "json")
        if data is None:
            return SkippedSample(self.where(index), "malformed record", "the sample has no .json member")
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            return SkippedSample(self.where(index), "malformed record", f"its JSON member is unusable ({error})")
        if not isinstance(record, dict):
            return SkippedSample(self.where(index), "malformed record", "not a JSON object")
        return record

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a worker process opens its own descriptors
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.shards[shard], os.O_RDONLY)
        data = b""
        while len(data) < size:  # pread: no shared file position
            chunk = os.pread(self._files[shard], size - len(data), offset + len(data))
            if not chunk:
                raise DatasetError(f"shard {self.folder / self.shards[shard]} is shorter than when it was indexed: "
                                   "it changed while being read")
            data += chunk
        return data

    def __getstate__(self) -> dict[str, Any]:  # a descriptor means nothing in another process: reopen there
        return {**self.__dict__, "_files": {}, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    if not folder.is_dir():
        raise DatasetError(f"shard folder {folder} does not exist" if not folder.exists() else
                           f"{folder} is not a folder")
    if not path.is_file():
        raise DatasetError(f"{folder} has no {INDEX}: not a shard folder, or `monovlm data shard` did not finish "
                           "writing it")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"{path} is not valid JSON ({error})") from error
    shards = index.get("shardlist") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("url"), str) and "/" not in entry["url"]
            and isinstance(entry.get("nsamples"), int) for entry in shards):
        raise DatasetError(f"{path} must hold a 'shardlist' of {{\"url\": tar name in the folder, \"nsamples\": "
                           "count}} entries")
    return index


def read_data_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[SkippedSample]]:
    """`read_records` for a data file or a shard folder: the records, and the unusable ones as skips (a folder's
    include those left out when it was written)."""
    if not Path(path).is_dir():
        return read_records(path)
    index = ShardIndex(path)
    records, skipped = [], list(index.skipped)
    for record in index:
        (skipped if isinstance(record, SkippedSample) else records).append(record)
    return records, skipped


# ---------------------------------------------------------------------------------------------------------------------
# the dataset


class ShardDataset:
    """`LlavaDataset` over a shard folder: item i is the processed record i (the i-th sample of the folder), its
    images decoded from the member bytes by the safe loader, or a SkippedSample saying why it cannot be used.

    Read as it is, the folder's records are read on demand (`ShardIndex`). `select` and `group_by_image` need all
    records at once: the JSON members are then read into memory (not the images), and each image is found by its
    name in the sample that holds it. `reply_weights` and `isolate_turns` as in LlavaDataset."""

    def __init__(self, path: str | os.PathLike, processor: Processor, group_by_image: bool = False,
                 group_seed: int = 0, select: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
                 label: str | None = None, reply_weights: Any = None, isolate_turns: bool = False):
        self.path = Path(path)
        self.processor = processor
        self.label = label
        self.reply_weights = reply_weights
        self.isolate_turns = isolate_turns
        self.index = ShardIndex(self.path)
        self.malformed: list[SkippedSample] = list(self.index.skipped)  # left out at shard time
        self.records: Sequence[dict[str, Any] | SkippedSample] = self.index
        self._by_name: dict[str, tuple[int, str]] | None = None  # image name -> (sample, member extension)
        if select is None and not group_by_image:
            return
        records, self._by_name = self._all_records()
        if select is not None:
            records = select(records)
        if group_by_image:
            records = merge_turns_by_image(records, seed=group_seed, fits=length_check(self.processor, self._header_size))
        self.records = records

    def _all_records(self) -> tuple[list[dict[str, Any]], dict[str, tuple[int, str]]]:
        records: list[dict[str, Any]] = []
        by_name: dict[str, tuple[int, str]] = {}
        for number, record in enumerate(self.index):
            if isinstance(record, SkippedSample):
                self.malformed.append(record)
                continue
            records.append(record)
            try:
                for name, extension in zip(image_names(record), image_extensions(record)):
                    by_name.setdefault(name, (number, extension))
            except SampleError:
                pass  # the processor names the malformed entry when it reads the record
        return records, by_name

    __len__ = LlavaDataset.__len__
    name = LlavaDataset.name

    def describe(self, index: int) -> str:
        record = self.records[index]
        if isinstance(record, SkippedSample):
            return record.where
        where = self.index.where(index) if self._by_name is None else f"{self.path.name} record {index}"
        record_id = record.get("id")
        return where + (f" (id={record_id})" if record_id is not None else "")

    def __getitem__(self, index: int) -> ProcessedSample | SkippedSample:
        record = self.records[index]
        if isinstance(record, SkippedSample):
            return record
        try:
            names = image_names(record)
            images = [self._load(index, record, number, name) for number, name in enumerate(names)]
            sample = self.processor.process(record, images=images, keys=names, isolate_turns=self.isolate_turns)
        except (SampleError, ImageLoadError) as error:
            return SkippedSample(self.describe(index), skip_reason(error), str(error))
        sample.image_keys = names  # as the file reader gives them: the keys of teachers' precomputed features
        if self.reply_weights is not None:
            sample.label_weights = self.reply_weights.label_weights(sample.labels, record, IGNORE_INDEX)
        return sample

    def _locate(self, index: int, record: dict[str, Any], number: int, name: str) -> tuple[int, str] | None:
        """(sample, member extension) holding image `number` (named `name`) of record `index`."""
        if self._by_name is None:
            return index, image_extensions(record)[number]
        return self._by_name.get(name)

    def _load(self, index: int, record: dict[str, Any], number: int, name: str) -> Image.Image:
        located = self._locate(index, record, number, name)
        data = None if located is None else self.index.member(*located)
        label = f"{name!r} (in {self.path.name})"
        if data is None:
            raise ImageLoadError(label, "is not in the shard folder")
        return load_image(data, max_source_pixels=self.processor.vision.max_source_pixels, name=label)

    def _header_size(self, name: str) -> tuple[int, int]:
        """(height, width) of image `name` from its member's header bytes (`length_check`'s reader)."""
        located = self._by_name.get(name)
        data = None if located is None else self.index.member(*located)
        if data is None:
            raise ImageLoadError(repr(name), "is not in the shard folder")
        return _header_size(data, repr(name))

    text_lengths = LlavaDataset.text_lengths
    new_report = LlavaDataset.new_report
    processed = LlavaDataset.processed


def shard_images(folder: str | os.PathLike) -> Iterator[list[tuple[str, Path, int, int]] | SkippedSample]:
    """Per record of a shard folder that names images, in order: (image name, tar path, offset, size) of each of its
    images; a SkippedSample per unusable record instead (those left out when it was written first)."""
    index = ShardIndex(folder)
    yield from index.skipped
    for number, record in enumerate(index):
        if isinstance(record, SkippedSample):
            yield record
            continue
        try:
            names, extensions = image_names(record), image_extensions(record)
        except SampleError as error:
            yield SkippedSample(index.where(number), "malformed image entry", str(error))
            continue
        slots = [index.slot(number, extension) for extension in extensions]
        if None in slots:
            missing = extensions[slots.index(None)]
            yield SkippedSample(index.where(number), "image unreadable",
                                f"the sample has no member .{missing} for image {names[slots.index(None)]!r}")
        elif names:
            tar = index.folder / index.shards[index.sample_shard[number]]
            yield [(name, tar, index.member_offsets[slot], index.member_sizes[slot])
                   for name, slot in zip(names, slots)]


def read_member(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar (one member's data)."""
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) != size:
        raise DatasetError(f"shard {path} is shorter than when it was indexed: it changed while being read")
    return data


__all__ = ["INDEX", "ShardDataset", "ShardIndex", "ShardSummary", "image_extensions", "image_names", "is_data_source",
           "is_shard_folder", "read_data_records", "read_member", "shard_images", "write_shards"]
