"""Precomputing a teacher's patch features once, so EVE's align loss costs no teacher forward in training.

`precompute_teacher_features` runs a teacher (a local CLIP/SigLIP folder, `hf:PATH`) over every image that a set of
LLaVA data files names — read through the safe loader and the model's resize policy, exactly as training feeds the
teacher — and writes {image key: (rows, cols, D)} to a safetensors file. A recipe then trains with
`[align] teacher = "features:FILE"` (a relative FILE is read under the data root). The keys are the image entries as
written in the data, which is how the trainer looks them up.

The file is written whole at the end (features are held in memory, in `dtype`: float16 halves them), through a
temporary name, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from monovlm.config import VisionConfig
from monovlm.data.datasets import SkipReport
from monovlm.data.image_files import DataSource, data_images, iter_pixels
from monovlm.model.teachers import HFVisionTeacher, precompute_features

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load_teacher_spec(spec: str, vision: VisionConfig, select_layer: int = -2, image_size: int | None = None,
                      device: str | torch.device = "cpu") -> HFVisionTeacher:
    """The teacher a `hf:PATH` spec names (the only kind worth precomputing: monovlm's own "vit" teacher is
    pretrained per run, and `features:` already are features)."""
    if not spec.startswith("hf:"):
        raise ValueError(f"teacher {spec!r}: precomputing features needs a local CLIP/SigLIP folder, 'hf:PATH'")
    return HFVisionTeacher.from_folder(spec[3:], select_layer=select_layer, image_size=image_size, vision=vision,
                                       device=device)


def precompute_teacher_features(
    teacher_spec: str,
    data_root: str | os.PathLike,
    data_files: Sequence[DataSource | str],
    out: str | os.PathLike,
    vision: VisionConfig | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    select_layer: int = -2,
    image_size: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Path, SkipReport]:
    """Write the teacher's features of every image of `data_files` (LLaVA JSON/JSONL, relative to `data_root`;
    a file name, or a (file, image root) pair) to `out`; return the file and the report of what was skipped.

    `vision`: the student's image settings (resize policy, mean/std) — the teacher sees the pixels training gives
    it; None = `VisionConfig()`'s defaults, so pass the recipe's `[model.vision]` for features that match training
    exactly. `out` relative to the working directory. Records with unusable image entries and unreadable images are
    skipped and counted (the report's summary is printed when `progress`); a key written twice is an error."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(FEATURE_DTYPES)}")
    if not data_files:
        raise ValueError("no data files: name the LLaVA JSON/JSONL files whose images to read")
    vision = vision or VisionConfig()
    teacher = load_teacher_spec(teacher_spec, vision, select_layer=select_layer, image_size=image_size,
                                device=device)
    report = SkipReport()
    images = data_images(data_root, data_files, report)
    if not images:
        raise ValueError(f"the data files {list(data_files)} under {data_root} name no images")
    loaded = iter_pixels(tqdm(images, desc="teacher features", unit="image", disable=not progress), vision, report)
    path = precompute_features(teacher, ((image.key, pixels) for image, pixels in loaded), out,
                               batch_size=batch_size, dtype=FEATURE_DTYPES[dtype])
    if progress:
        print(f"wrote {path}: {report.summary()}")
    return path, report
