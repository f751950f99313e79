"""Frozen vision teachers for EVE's patch-aligning loss (training only).

A teacher turns the batch's images — (3, H, W) tensors normalised with the model's `VisionConfig` mean/std, exactly as
the processor made them — into one patch-feature map (rows_t, cols_t, D) per image, without gradients. The aligner
(`monovlm.model.align`) resamples each map to the student's grid. Teachers are plain objects, not `nn.Module`s, so
they cannot end up inside `EncoderFreeVLM`, its optimiser or its checkpoint: they are loaded for training only and
never saved with the inference model.

- `ViTTeacher`: monovlm's own small ViT (`monovlm.model.vit`), e.g. the encoder of a trained baseline.
- `HFVisionTeacher`: a local CLIP or SigLIP folder read with `transformers` (an optional dependency, imported only
  here, only when used). EVE used CLIP ViT-L/14-336 with `select_layer=-2`.
- `PrecomputedTeacher`: features computed once (`precompute_features`; for a data folder
  `monovlm.train.teacher_features`) and stored in a safetensors file by key, so training pays nothing for the teacher.
- `WhitenedTeacher`: any of these with ZCA-whitened features.

`build_teacher` makes the one a recipe's [align] table names. Everything it reads besides the teacher itself — the
images the "vit" teacher pretrains on, the images whitening is fitted on — comes from the recipe's own LLaVA data
files, so a teacher works on any data set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.image_files import DataSource, data_images, iter_pixels

# Defaults when a folder has no preprocessor_config.json: OpenAI CLIP's and SigLIP's published normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

FEATURES_KIND = "monovlm-teacher-features"  # metadata tag of a precomputed-features file

# how the "vit" teacher is pretrained: "mae" on any images, "labels" on the synthetic scenes (monovlm.train.vit_pretrain)
TEACHER_OBJECTIVES = ("mae", "labels", "qa")


@runtime_checkable
class Teacher(Protocol):
    """images [(3, H, W)] (normalised with a VisionConfig's mean/std) -> [(rows_t, cols_t, feature_dim)], frozen,
    computed in eval mode without gradients. `keys` name the images (data-root-relative path or sample id); teachers
    that compute features ignore them, `PrecomputedTeacher` needs them."""

    feature_dim: int

    def __call__(self, images: Sequence[torch.Tensor], keys: Sequence[str] | None = None) -> list[torch.Tensor]: ...


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class ViTTeacher:
    """monovlm's own ViT as a teacher: `vit.features(images) -> [(rows, cols, width)]`, width = `vit.config.width`."""

    def __init__(self, vit: torch.nn.Module):
        if not hasattr(vit, "features"):
            raise TypeError(f"ViTTeacher needs a model with .features(images), got {type(vit).__name__}")
        self.vit = _freeze(vit)
        self.feature_dim = int(vit.config.width)

    def to(self, *args, **kwargs) -> "ViTTeacher":
        self.vit.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor], keys: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Runs where the ViT's weights are; the features come back on the images' device."""
        if not images:
            return []
        self.vit.eval()  # stays in eval even if someone called .train() on it in between
        device = next(self.vit.parameters()).device
        features = self.vit.features([image.to(device) for image in images])
        return [f.detach().to(images[0].device) for f in features]


class HFVisionTeacher:
    """A CLIP or SigLIP vision tower from a local folder, frozen.

    Our pixels are un-normalised with `vision`'s mean/std back to [0, 1], resized (bicubic, antialiased) to the
    model's square `image_size` — the whole image, aspect ratio not kept, so the teacher's g×g grid covers the same
    area as the student's grid —, normalised with the model's own mean/std, and `hidden_states[select_layer]` gives
    the patch tokens (CLIP's CLS dropped; SigLIP has none), reshaped to (g, g, D) with g = image_size // patch_size.
    """

    def __init__(self, model: torch.nn.Module, vision: VisionConfig, select_layer: int = -2,
                 image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, has_cls: bool | None = None, batch_size: int = 32):
        config = model.config
        kind = getattr(config, "model_type", "")
        if has_cls is None:
            has_cls = not kind.startswith("siglip")
        default_mean, default_std = (SIGLIP_MEAN, SIGLIP_STD) if kind.startswith("siglip") else (CLIP_MEAN, CLIP_STD)
        self.model = _freeze(model)
        self.vision = vision
        self.has_cls = has_cls
        self.batch_size = batch_size
        self.patch_size = int(config.patch_size)
        self.image_size = int(image_size if image_size is not None else config.image_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of the teacher's patch_size="
                             f"{self.patch_size}")
        depth = int(config.num_hidden_layers)
        if not -(depth + 1) <= select_layer <= depth:
            raise ValueError(f"select_layer={select_layer} is outside the teacher's {depth} layers "
                             f"(hidden_states has {depth + 1} entries)")
        self.select_layer = select_layer
        self.grid = self.image_size // self.patch_size
        self.feature_dim = int(config.hidden_size)
        self.interpolate_pos_encoding = self.image_size != int(config.image_size)
        mean, std = tuple(mean if mean is not None else default_mean), tuple(std if std is not None else default_std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, select_layer: int = -2, image_size: int | None = None, *,
                    vision: VisionConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> "HFVisionTeacher":
        """Load a local CLIP / SigLIP folder (vision-only or full model; the text tower is not loaded).

        Mean/std come from the folder's preprocessor_config.json when it has one, else CLIP_MEAN/CLIP_STD for CLIP
        and SIGLIP_MEAN/SIGLIP_STD (0.5) for SigLIP. A vision weight missing from the checkpoint is an error."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"teacher folder {folder} does not exist" if not folder.exists()
                                    else f"teacher path {folder} is not a folder")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"teacher folder {folder} has no config.json")
        kind = json.loads(config_file.read_text()).get("model_type")
        try:
            import transformers
        except ImportError as error:
            raise ImportError("HFVisionTeacher needs the optional dependency `transformers` "
                              "(pip install transformers); or precompute the features where it is installed and "
                              "train with PrecomputedTeacher") from error
        classes = {"clip": transformers.CLIPVisionModel, "clip_vision_model": transformers.CLIPVisionModel,
                   "siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel}
        if kind not in classes:
            raise ValueError(f"{config_file} has model_type={kind!r}; HFVisionTeacher reads {sorted(classes)}")
        model, info = classes[kind].from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                    output_loading_info=True)
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise ValueError(f"the teacher checkpoint in {folder} is missing weight(s) {missing[:10]}; refusing to "
                             "use randomly initialised teacher weights")
        mean = std = None
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            values = json.loads(preprocessor.read_text())
            mean, std = values.get("image_mean"), values.get("image_std")
        return cls(model.to(device), vision, select_layer=select_layer, image_size=image_size, mean=mean, std=std,
                   batch_size=batch_size)

    def to(self, *args, **kwargs) -> "HFVisionTeacher":
        self.model.to(*args, **kwargs)
        return self

    def preprocess(self, images: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """[(3, H, W)] normalised our way -> (B, 3, S, S) normalised the teacher's way (float32, on `device`)."""
        our_mean = torch.tensor(self.vision.image_mean, dtype=torch.float32, device=device).view(3, 1, 1)
        our_std = torch.tensor(self.vision.image_std, dtype=torch.float32, device=device).view(3, 1, 1)
        size = (self.image_size, self.image_size)
        resized = []
        for image in images:
            pixels = image.detach().to(device, torch.float32) * our_std + our_mean  # (3, H, W) in [0, 1]
            pixels = F.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False, antialias=True)
            resized.append(pixels.clamp_(0.0, 1.0)[0])  # bicubic overshoots a little at the edges
        return (torch.stack(resized) - self.mean.to(device)) / self.std.to(device)  # (B, 3, S, S)

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor], keys: Sequence[str] | None = None) -> list[torch.Tensor]:
        if not images:
            return []
        self.model.eval()
        parameter = next(self.model.parameters())
        outputs = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size], parameter.device).to(parameter.dtype)
            result = self.model(pixel_values=pixels, output_hidden_states=True,
                                interpolate_pos_encoding=self.interpolate_pos_encoding)
            tokens = result.hidden_states[self.select_layer]  # (b, [1 +] g², D)
            if self.has_cls:
                tokens = tokens[:, 1:]
            if tokens.shape[1] != self.grid * self.grid:
                raise RuntimeError(f"the teacher gave {tokens.shape[1]} patch tokens, expected {self.grid}² "
                                   f"(image_size={self.image_size}, patch_size={self.patch_size})")
            outputs += list(tokens.reshape(-1, self.grid, self.grid, self.feature_dim).unbind(0))
        return [features.to(images[0].device) for features in outputs]


class MissingTeacherFeatures(KeyError):
    """A key with no stored features; the message names the key and the file."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class PrecomputedTeacher:
    """Teacher features stored in a safetensors file: key (data-root-relative image path, or sample id) ->
    (rows, cols, D). Written by `precompute_features`. Reads lazily; the file stays memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed teacher features {self.path} do not exist")
        self._file = None
        with safe_open(str(self.path), framework="pt") as file:
            metadata = file.metadata() or {}
            self._keys = frozenset(file.keys())
            if "feature_dim" in metadata:
                self.feature_dim = int(metadata["feature_dim"])
            elif self._keys:
                self.feature_dim = int(file.get_slice(next(iter(self._keys))).get_shape()[-1])
            else:
                raise ValueError(f"{self.path} holds no features and no feature_dim metadata")

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __getstate__(self) -> dict:  # the open handle does not pickle (DataLoader workers); reopen there
        return {**self.__dict__, "_file": None}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise MissingTeacherFeatures(f"no teacher features for key {key!r} in {self.path}")
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        features = self._file.get_tensor(key)
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"teacher features {key!r} in {self.path} have shape {tuple(features.shape)}, expected "
                             f"(rows, cols, {self.feature_dim})")
        return features

    def __call__(self, images: Sequence[torch.Tensor] | None, keys: Sequence[str] | None = None) -> list[torch.Tensor]:
        if keys is None:
            raise ValueError("PrecomputedTeacher needs keys (one per image) to look the features up")
        if images is not None and len(images) != len(keys):
            raise ValueError(f"{len(images)} image(s) but {len(keys)} key(s)")
        device = images[0].device if images else torch.device("cpu")
        return [self.get(key).to(device) for key in keys]

    def to(self, *args, **kwargs) -> "PrecomputedTeacher":
        return self  # features follow the images' device at each call


def precompute_features(teacher: Teacher, images_with_keys: Iterable[tuple[str, torch.Tensor]],
                        out_path: str | os.PathLike, batch_size: int = 16,
                        dtype: torch.dtype | None = None) -> Path:
    """Run `teacher` over (key, image) pairs and write {key: (rows, cols, D)} to a safetensors file for
    `PrecomputedTeacher`. Keys must be unique; `dtype` (e.g. torch.float16) shrinks the file. The file is written
    whole at the end (features are held in memory), through a temporary name, so a crash leaves no half file."""
    out = Path(out_path)
    features: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        keys = [key for key, _ in pending]
        for key, feats in zip(keys, teacher([image for _, image in pending], keys)):
            feats = feats.detach().cpu()
            features[key] = (feats.to(dtype) if dtype is not None else feats).contiguous()
        pending.clear()

    for key, image in images_with_keys:
        if key in features or any(key == k for k, _ in pending):
            raise ValueError(f"duplicate key {key!r} in precompute_features")
        pending.append((key, image))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(features, str(partial), metadata={"format": "pt", "kind": FEATURES_KIND,
                                                "feature_dim": str(teacher.feature_dim)})
    os.replace(partial, out)
    return out


def teacher_vision(vision: VisionConfig, patch_size: int | None) -> VisionConfig:
    """The student's VisionConfig with the teacher's patch side: same pixels per token (so the same resize policy
    and the same image sizes), split as patch_size × merge."""
    if patch_size is None or patch_size == vision.patch_size:
        return vision
    token = vision.pixels_per_token
    if patch_size < 1 or token % patch_size:
        raise ValueError(f"teacher_patch_size={patch_size} must divide the model's {token} pixels per token")
    return dataclasses.replace(vision, patch_size=patch_size, merge=token // patch_size)


TEACHER_SETTINGS_FILE = "made_with.json"
TEACHER_QUESTIONS_FILE = "questions.json"  # [align] teacher_questions: the teacher's own yes/no questions and answers


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# the student's embedder, which a "vit" teacher's pretraining never reads: a change to these keeps RUN/teacher
_STUDENT_ONLY_VISION = {field.name: field.default for field in dataclasses.fields(VisionConfig)
                        if field.name in ("embedder", "embedder_width", "embedder_heads", "embedder_context",
                                          "embedder_context_layers", "patch_bias", "stem", "stem_depth",
                                          "image_position")}


def _vit_teacher_settings(align, vision: VisionConfig, data_root, sources: Sequence) -> dict[str, Any]:
    """What a pretrained "vit" teacher depends on: its settings, the image geometry and the data it read (the hash
    of scenes.json for "labels", of the data files for "mae"). RUN/teacher is reused (resume, a second run into the
    same folder) only when all of these match; the student's own embedder settings are recorded at their defaults."""
    root = Path(data_root)
    digest = hashlib.sha256()
    if align.teacher_objective == "labels":
        files = [root / "scenes.json"]
    else:
        files = [root / (source if isinstance(source, str) else source[0]) for source in sources]
        digest.update(json.dumps([list(s) if not isinstance(s, str) else s for s in sources]).encode())
    for file in files:
        digest.update(file.read_bytes() if file.is_file() else b"(missing)")
    settings = {"objective": align.teacher_objective, "width": align.teacher_width, "depth": align.teacher_depth,
                "heads": align.teacher_heads, "steps": align.teacher_steps, "lr": align.teacher_lr,
                "vision": {**teacher_vision(vision, align.teacher_patch_size).to_dict(), **_STUDENT_ONLY_VISION},
                "data_sha256": digest.hexdigest()}
    if align.teacher_stem != "patch":  # only when set: teachers pretrained before the option still match
        settings["stem"] = align.teacher_stem
    if align.teacher_stem_depth != 1:
        settings["stem_depth"] = align.teacher_stem_depth
    if align.teacher_head != "film":
        settings["head"] = align.teacher_head
    if align.teacher_seed:
        settings["seed"] = align.teacher_seed
    if align.asks_questions:
        settings["questions"] = {"per_image": align.teacher_questions, "confidence": align.teacher_confidence}
        if align.teacher_yes_share != "data":  # only when set: teachers that asked before the option still match
            settings["questions"]["yes_share"] = align.teacher_yes_share
        if align.teacher_open_questions:
            settings["questions"]["open_per_image"] = align.teacher_open_questions
    return json.loads(json.dumps(settings))  # as read back from the file: tuples become lists


def recorded_sources(run_dir) -> list[DataSource]:
    """The (data file, image root) pairs of every stage of the recipe the trainer recorded in RUN/recipe.json, each
    once (as `stage_sources` gives them for the recipe object)."""
    if run_dir is None:
        raise ValueError("the teacher reads the images of the recipe's data files: pass sources= "
                         "(monovlm.data.image_files.stage_sources(recipe.stages)) or the run folder")
    recipe_file = Path(run_dir) / "recipe.json"
    if not recipe_file.is_file():
        raise FileNotFoundError(f"the teacher reads the images of the recipe's data files, but none were given and "
                                f"{recipe_file} (where the trainer records the recipe) does not exist")
    sources: dict[DataSource, None] = {}
    for stage in json.loads(recipe_file.read_text()).get("stages", []):
        for file in [stage["data"]] if isinstance(stage["data"], str) else stage["data"]:
            sources[(file, stage.get("image_root"))] = None
    return list(sources)


def resolve_features_path(spec_path: str, data_root) -> Path:
    """A `features:PATH` file: an absolute PATH as is, a relative one under the data root (like the data files)."""
    path = Path(spec_path).expanduser()
    if not path.is_absolute():
        path = Path(data_root) / path
    if not path.is_file():
        raise FileNotFoundError(f"precomputed teacher features {path} do not exist (a relative features: path is read "
                                f"under the data root, --data {data_root}); write them with `monovlm teacher features`")
    return path


STEM_EMBEDDERS = {"eve": "stem", "conv": "patch_conv"}  # embedder -> the attribute holding its patch stem


def check_stem_init(align, vision: VisionConfig) -> None:
    """Why `[align] init_stem` cannot copy the teacher's stem into the student (a ConfigError), or nothing."""
    teacher_patch = align.teacher_patch_size or vision.patch_size
    copied = vision.stem.removeprefix("patch+")  # a summed stem ("patch+cnn") takes the teacher's into its second part
    mismatches = [] if copied == align.teacher_stem else [
        f"stem: student {vision.stem!r}, teacher {align.teacher_stem!r}"]
    if copied == "patch":  # the embedder's strided conv and the ViT's differ in their bias
        mismatches.append("stem 'patch': only a 'cnn' or 'conv' stem (alone or after 'patch+') is copied")
    if copied == "conv" and vision.stem_depth != align.teacher_stem_depth:
        mismatches.append(f"stem depth: student {vision.stem_depth!r}, teacher {align.teacher_stem_depth!r}")
    mismatches += [f"{name}: student {student!r}, teacher {teacher!r}" for name, student, teacher in (
        ("patch side", vision.patch_size, teacher_patch), ("width", vision.embedder_width, align.teacher_width))
        if student != teacher]
    if align.teacher != "vit":
        mismatches.insert(0, f"teacher is {align.teacher!r}, not monovlm's own \"vit\"")
    if vision.embedder not in STEM_EMBEDDERS:
        mismatches.insert(0, f"embedder {vision.embedder!r} has no patch stem of its own (use one of "
                             f"{sorted(STEM_EMBEDDERS)})")
    if mismatches:
        raise ConfigError("[align] init_stem = true copies the teacher's patch stem into the student's embedder, "
                          "which needs the same stem (cnn or conv), patch side and width on both sides; here: "
                          + "; ".join(mismatches)
                          + " (set [model.vision] stem / patch_size / embedder_width and [align] teacher_stem / "
                          "teacher_patch_size / teacher_width alike, or [align] init_stem = false)")


def init_stem_from_teacher(embedder: torch.nn.Module, vit: torch.nn.Module) -> None:
    """The embedder's patch stem takes the teacher ViT's patch stem weights and buffers (BatchNorm running
    statistics included); checked first with `check_stem_init`. A summed stem ("patch+cnn", "patch+conv"): its
    CNN (convs) takes them and its patch part starts at zero, so the stem's output is the teacher's."""
    stem = getattr(embedder, STEM_EMBEDDERS[embedder.config.embedder])
    if embedder.config.stem.startswith("patch+"):
        stem.convs.load_state_dict(vit.patch_embed.state_dict())
        with torch.no_grad():
            for tensor in stem.patch.parameters():
                tensor.zero_()
        return
    stem.load_state_dict(vit.patch_embed.state_dict())


def build_teacher(align, vision: VisionConfig, data_root, run_dir, info=None, progress: bool = True,
                  sources: Sequence | None = None, hf_dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", pretrain_dtype: torch.dtype | None = None) -> Teacher:
    """The teacher an [align] recipe table names, ZCA-whitened when `align.whiten` (any teacher):

    - "vit": monovlm's own small ViT, pretrained once with `align.teacher_objective` — "mae" (masked patch
      prediction on the images of the recipe's data files: any data), "qa" (the image tower of a classifier of the
      data files' short answers: any QA data) or "labels" (the synthetic scenes' dense labels) — and kept in
      RUN/teacher (reused while its settings and data match, e.g. on resume);
    - "hf:PATH": a local CLIP/SigLIP folder;
    - "features:PATH": precomputed features keyed by image path (a relative PATH is read under `data_root`).

    `sources`: the (data file, image root) pairs that the "mae" and "qa" objectives and whitening read (relative to
    `data_root`; `monovlm.data.image_files.stage_sources(recipe.stages)`); None = those of the recipe the trainer
    recorded in RUN/recipe.json. `hf_dtype`: an "hf:" teacher's weights are stored in it (the trainer passes its
    bf16 autocast dtype: the teacher runs without grad, its matmuls in bf16 anyway, and a SigLIP-so400m then takes
    0.8 GiB per device instead of 1.6). `device`: where the teacher runs and its whitening is applied (the trainer
    passes its own: a teacher left on the CPU beside a CUDA model would fail, or crawl); the "vit" objectives
    pretrain on the CPU, "qa" in `pretrain_dtype` autocast when given (the trainer passes bfloat16 where this CPU has
    native bf16 matmuls and the run is not float32). The dtype is not among the settings a kept teacher must match:
    a run resumed elsewhere keeps its teacher.
    """
    spec = align.teacher
    is_main = info is None or info.is_main
    if spec.startswith("hf:"):
        teacher = HFVisionTeacher.from_folder(spec[3:], vision=vision, dtype=hf_dtype or torch.float32,
                                              device=device)
    elif spec.startswith("features:"):
        teacher = PrecomputedTeacher(resolve_features_path(spec[len("features:"):], data_root))
    elif spec == "vit":
        if align.teacher_objective not in TEACHER_OBJECTIVES:
            raise ValueError(f"[align] teacher_objective={align.teacher_objective!r} is not one of "
                             f"{TEACHER_OBJECTIVES}")
        from monovlm.model.vit import load_vit, save_vit
        from monovlm.train.vit_pretrain import pretrain_vit

        folder = Path(run_dir) / "teacher"
        if is_main:
            if align.teacher_objective != "labels" and sources is None:
                sources = recorded_sources(run_dir)
            made_with = _vit_teacher_settings(align, vision, data_root, sources or [])
            if _read_json_or_none(folder / TEACHER_SETTINGS_FILE) != made_with:
                if (folder / "vit.json").is_file():
                    print(f"{folder} was pretrained with other settings or data: pretraining the teacher again")
                config = align.teacher_encoder()
                report: dict = {}
                vit = pretrain_vit(data_root, config, teacher_vision(vision, align.teacher_patch_size),
                                   steps=align.teacher_steps, objective=align.teacher_objective, sources=sources,
                                   lr=align.teacher_lr, seed=align.teacher_seed, report=report, progress=progress,
                                   questions=align.teacher_questions, confidence=align.teacher_confidence,
                                   even_answers=align.teacher_yes_share == "even", autocast=pretrain_dtype,
                                   open_questions=align.teacher_open_questions, head=align.teacher_head)
                save_vit(vit, folder)
                if align.teacher_head == "lookup":  # its attention maps are look supervision's targets
                    from monovlm.train.vit_qa import save_qa_head

                    save_qa_head(folder, *report["qa_head"])
                if align.asks_questions:
                    (folder / TEACHER_QUESTIONS_FILE).write_text(json.dumps(report["teacher_questions"]))
                (folder / "pretrain_report.json").write_text(json.dumps(
                    {k: v for k, v in report.items() if k not in ("losses", "teacher_questions", "qa_head")}, indent=1))
                (folder / TEACHER_SETTINGS_FILE).write_text(json.dumps(made_with, indent=1) + "\n")
        if info is not None and info.enabled:
            import torch.distributed as dist

            dist.barrier()  # other ranks wait for rank 0's teacher
        teacher = ViTTeacher(load_vit(folder).to(device))
    else:
        raise ValueError(f"unknown teacher {spec!r}: use 'vit', 'hf:PATH' or 'features:PATH'")
    if align.whiten:
        if sources is None:
            sources = recorded_sources(run_dir)
        teacher = whiten_on_data(teacher, vision, data_root, sources, align.whiten_images).to(device)
    return teacher


def whiten_on_data(teacher: Teacher, vision: VisionConfig, data_root, sources: Sequence,
                   limit: int) -> "WhitenedTeacher":
    """Fit `WhitenedTeacher` on the first `limit` images the data files name (the images training feeds the
    teacher: the safe loader, `vision`'s resize policy). A `PrecomputedTeacher` is fitted on its stored features of
    those images (no pixels read); unreadable images and images without stored features are passed over."""
    listed = data_images(data_root, sources)
    if isinstance(teacher, PrecomputedTeacher):
        keys = [image.key for image in listed if image.key in teacher][:limit]
        if not keys:
            raise ValueError(f"whitening the teacher: none of the {len(listed)} images of the data files has "
                             f"features in {teacher.path}")
        return WhitenedTeacher.fit(teacher, None, keys=keys)
    images = []
    for _, pixels in iter_pixels(listed, vision):
        images.append(pixels)
        if len(images) == limit:
            break
    if not images:
        raise ValueError(f"whitening the teacher needs images; the data files {list(sources)} under {data_root} "
                         "name none that can be read")
    return WhitenedTeacher.fit(teacher, images)


class WhitenedTeacher:
    """A teacher whose patch features are ZCA-whitened: (f - mean) @ W with W = C^(-1/2) of the features' covariance C
    (eigenvalues floored at `eps` times their mean), so each feature direction has unit variance over the fit images."""

    def __init__(self, teacher: Teacher, mean: torch.Tensor, transform: torch.Tensor):
        self.teacher, self.mean, self.transform = teacher, mean, transform
        self.feature_dim = teacher.feature_dim

    @classmethod
    @torch.no_grad()
    def fit(cls, teacher: Teacher, images: Sequence[torch.Tensor] | None, eps: float = 1e-3, batch: int = 64,
            keys: Sequence[str] | None = None) -> "WhitenedTeacher":
        """Fit on the teacher's features of `images` (or, for a `PrecomputedTeacher`, of `keys`; images None)."""
        count = len(images) if images is not None else len(keys or ())
        if not count:
            raise ValueError("whitening the teacher needs at least one image")
        chunks = []
        for start in range(0, count, batch):
            chunk_images = images[start:start + batch] if images is not None else None
            chunk_keys = keys[start:start + batch] if keys is not None else None
            chunks += [f.reshape(-1, f.shape[-1]).float() for f in teacher(chunk_images, chunk_keys)]
        features = torch.cat(chunks)  # (N_patches, D)
        mean = features.mean(0)
        covariance = torch.cov((features - mean).T)  # (D, D)
        values, vectors = torch.linalg.eigh(covariance)
        values = values.clamp_min(eps * values.mean())
        return cls(teacher, mean, vectors @ torch.diag(values.rsqrt()) @ vectors.T)

    def to(self, *args, **kwargs) -> "WhitenedTeacher":
        self.teacher.to(*args, **kwargs)
        self.mean, self.transform = self.mean.to(*args, **kwargs), self.transform.to(*args, **kwargs)
        return self

    def __call__(self, images: Sequence[torch.Tensor], keys: Sequence[str] | None = None) -> list[torch.Tensor]:
        features = self.teacher(images, keys)
        return [((f.float() - self.mean) @ self.transform).to(f.dtype) for f in features]
