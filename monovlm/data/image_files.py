"""The images that LLaVA data files name, for the readers that need images without text: the teacher's
self-supervised pretraining, whitening, precomputed teacher features, the baseline encoder's pretraining.

Each image is listed once, under its key — the entry as written in the data, which is also the key the processor
hands a teacher (`ProcessedSample.image_keys`) — with its path resolved the way the datasets resolve it: under the
stage's `image_root` (relative to the data root) or else the data file's own folder, refusing a path that escapes
that root. A data source may also be a shard folder (`monovlm data shard`): its images are the members of its tars,
listed under the names the records give them, and read from the tar. Pixels come through the one safe loader
(`monovlm.data.images.load_image`) and the resize policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from monovlm.config import VisionConfig
from monovlm.data.datasets import DatasetError, SkippedSample, SkipReport, read_records
from monovlm.data.images import ImageLoadError, ImagePathError, image_path_under, image_to_tensor, load_image
from monovlm.data.shards import read_member, shard_images

# (data file, image root or None), both relative to the data root; None = the data file's folder
DataSource = tuple[str, str | None]


@dataclass(frozen=True)
class DataImage:
    key: str  # the image entry as written in the data
    path: Path  # resolved under its image root; for an image in a shard folder, its tar
    member: tuple[int, int] | None = None  # (offset, size) of its bytes in the tar `path`; None: `path` is the image


def stage_sources(stages: Iterable) -> list[DataSource]:
    """(data file, image root) of every data file of every stage, each pair once, in order. `stages`: objects with
    `data_files` ((file, repeat, grouped) triples) and `image_root`, i.e. a recipe's `StageConfig`s."""
    sources: dict[DataSource, None] = {}
    for stage in stages:
        for file, _, _ in stage.data_files:
            sources[(file, stage.image_root)] = None
    return list(sources)


def data_images(data_root: str | os.PathLike, sources: Sequence[DataSource | str],
                report: SkipReport | None = None) -> list[DataImage]:
    """Every image the data files name, once each, in order of first appearance.

    A missing data file is a `DatasetError` naming it; a record whose image entry is malformed or escapes the image
    root is skipped and counted in `report`. One key naming two different files (two image roots) is an error: a
    teacher's precomputed features could not tell them apart. An image of a shard folder holds the bytes of the file
    it was written from, so it is taken to be the same image as a file or another folder's image of its key."""
    root = Path(data_root)
    images: dict[str, DataImage] = {}
    for source in sources:
        file, image_root = (source, None) if isinstance(source, str) else source
        path = root / file
        if path.is_dir():
            _add_shard_images(path, images, report)
            continue
        if not path.is_file():
            raise DatasetError(f"data file {path} does not exist (data files are read under the data root {root})")
        base = (root / image_root if image_root is not None else path.parent).resolve()
        records, malformed = read_records(path)
        for skipped in malformed:
            if report is not None:
                report.record(skipped)
        for number, record in enumerate(records):
            entry = record.get("image", record.get("images"))
            if entry is None:
                continue  # a text-only sample
            names = [entry] if isinstance(entry, str) else entry
            where = f"{path.name} record {number}"
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                _skip(report, where, "malformed image entry", "'image' must be a path string or a list of them")
                continue
            try:
                resolved = [image_path_under(base, name) for name in names]  # the readers' one rule
            except ImagePathError as error:  # outside the image root, or no usable path at all (a NUL byte, ...)
                reason = "image path invalid" if "cannot be resolved" in str(error) else "image path escapes the root"
                _skip(report, where, reason, str(error))
                continue
            if report is not None:
                report.record(record)
            for name, image_path in zip(names, resolved):
                known = images.get(name)
                if known is None:
                    images[name] = DataImage(name, image_path)
                elif known.member is None and known.path != image_path:
                    raise DatasetError(f"image key {name!r} names two files, {known.path} and {image_path} (data "
                                       "files with different image roots): keys must be unique")
    return list(images.values())


def _add_shard_images(folder: Path, images: dict[str, DataImage], report: SkipReport | None) -> None:
    """A shard folder's images into `images` (the first of a key kept), its unusable records counted in `report`."""
    for item in shard_images(folder):
        if report is not None:
            report.record(item)
        if isinstance(item, SkippedSample):
            continue
        for name, tar, offset, size in item:
            images.setdefault(name, DataImage(name, tar, (offset, size)))


def _skip(report: SkipReport | None, where: str, reason: str, detail: str) -> None:
    if report is not None:
        report.record(SkippedSample(where, reason, detail))


def load_pixels(image: DataImage, vision: VisionConfig) -> torch.Tensor:
    """(3, H, W) model input for one listed image: the safe loader, then `vision`'s resize policy and normalisation.
    Raises `ImageLoadError` naming the key."""
    source = image.path
    if image.member is not None:
        source = read_member(image.path, *image.member)
    return image_to_tensor(load_image(source, max_source_pixels=vision.max_source_pixels,
                                      name=f"{image.key!r} ({image.path})"), vision)


def iter_pixels(images: Iterable[DataImage], vision: VisionConfig,
                report: SkipReport | None = None) -> Iterator[tuple[DataImage, torch.Tensor]]:
    """(image, pixels) for each image that loads; an unreadable one is skipped and counted in `report`."""
    for image in images:
        try:
            pixels = load_pixels(image, vision)
        except ImageLoadError as error:
            _skip(report, image.key, "image unreadable", str(error))
            continue
        if report is not None:
            report.record(image)
        yield image, pixels
