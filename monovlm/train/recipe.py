"""Training recipes as TOML files: the model to build, the teacher for EVE's align loss, and the stages.

A stage names its data, its template, what trains, its learning rates and its length. Stages run in order, each
starting from the previous one's weights with a fresh optimizer and schedule (as EVE's separate stage scripts do).
Everything not written in the file takes the dataclass default below, and unknown keys are errors that name the key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.config import ConfigError

PARTS = ("embedder", "encoder", "projector", "decoder", "experts", "align")


LOSS_NORMS = ("token", "sample")


@dataclass
class StageConfig:
    name: str
    # LLaVA JSON/JSONL, relative to the data root; or a list of files read as one mixture (see `repeat`)
    data: str | list[str]
    template: str = "chatml"  # "plain" for caption pre-training
    # chatml: a system turn opening every conversation that has none; the last stage's is saved with the model, so
    # evaluation, `monovlm chat` and the server open their prompts with it too
    system_prompt: str | None = None
    image_root: str | None = None  # relative to the data root; default: the data file's folder
    # with a list of files: how many times each is read per epoch (default once each). The mixture's shares of the
    # batches are the files' sample counts times these: e.g. [2, 1] reads the first file's samples twice as often
    repeat: list[int] | None = None
    # explicit trainable parts (torchtune style): "embedder" (encoder-free pixel embedder), "encoder" and "projector"
    # (the baseline's ViT and MLP), "decoder" (language weights), "experts" (vision experts), "align" (EVE's head)
    train: list[str] = field(default_factory=lambda: ["embedder", "decoder", "experts"])
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of each group's peak lr
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # samples per micro-batch (per rank)
    grad_accum: int = 1
    clip_grad: float = 1.0
    # how the summed token loss is normalised: "token" (mean over the global batch's labelled tokens, LLaVA's) or
    # "sample" (mean over samples of each sample's token mean: a one-answer sample weighs as much as a long one)
    loss_norm: str = "token"
    pack: bool = False  # pack samples into rows of max_length tokens
    # merge one-question records of an image into one multi-turn sample (LLaVA style); with a list of data files,
    # true/false for all of them or a list with one flag per file
    group_by_image: bool | list[bool] = False
    group_by_length: bool = False  # batches of samples of similar length (less padding; LLaVA's group_by_length)
    max_length: int = 512
    align: bool = False  # add EVE's patch-align loss (needs [align] in the recipe)
    eval_every: int = 0  # optimizer steps between evals (0 = only at the end of the stage)
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end of the stage)
    init_experts: bool = False  # copy language weights into the vision experts at the start of this stage

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        unknown = [p for p in self.train if p not in PARTS]
        if unknown:
            raise ConfigError(f"stage {self.name!r}: unknown part(s) {unknown}; parts are {PARTS}")
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError(f"stage {self.name!r}: steps, batch_size and grad_accum must be positive")
        self._check_data()
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"stage {self.name!r}: loss_norm {self.loss_norm!r} is not one of {LOSS_NORMS}")
        if self.align and "align" not in self.train:
            self.train = [*self.train, "align"]

    @property
    def _files(self) -> list[str]:  # the data files as a list, also when `data` names one
        return [self.data] if isinstance(self.data, str) else self.data

    def _check_data(self) -> None:
        files = self._files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise ConfigError(f"stage {self.name!r}: data must be a file name or a non-empty list of file names, "
                              f"got {self.data!r}")
        if isinstance(self.group_by_image, list) and (
                isinstance(self.data, str) or len(self.group_by_image) != len(files)
                or not all(isinstance(flag, bool) for flag in self.group_by_image)):
            raise ConfigError(f"stage {self.name!r}: group_by_image must be true/false or one true/false per data "
                              f"file ({len(files)}), got {self.group_by_image!r}")
        if self.repeat is None:
            return
        if isinstance(self.data, str):
            raise ConfigError(f"stage {self.name!r}: repeat needs data to be a list of files")
        if (not isinstance(self.repeat, list) or len(self.repeat) != len(files)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.repeat)):
            raise ConfigError(f"stage {self.name!r}: repeat must be one positive integer per data file "
                              f"({len(files)}), got {self.repeat!r}")

    @property
    def data_files(self) -> list[tuple[str, int, bool]]:
        """(file, times read per epoch, grouped by image) for each of the stage's data files."""
        files = list(self._files)
        grouped = self.group_by_image if isinstance(self.group_by_image, list) else [self.group_by_image] * len(files)
        return list(zip(files, self.repeat or [1] * len(files), grouped))


@dataclass
class AlignConfig:
    teacher: str = "vit"  # "vit" (monovlm's own, pretrained on the data), "hf:PATH" (CLIP/SigLIP), "features:PATH"
    teacher_steps: int = 300  # pretraining steps of the "vit" teacher
    teacher_lr: float = 2e-3
    teacher_width: int = 128
    teacher_depth: int = 3
    teacher_heads: int = 4
    # the "vit" teacher's patch side in pixels; None = the model's patch_size. It must divide the model's pixels per
    # token (so the student's images patchify exactly); a teacher patch of one whole token (e.g. 8 for eve's 4×2)
    # costs ~4× less per pretraining step than a 4 px one
    teacher_patch_size: int | None = None
    layers: list[int] | None = None  # decoder layers to align; None = EVE's every-4th-layer rule
    loss: str = "cosine"
    weight: float = 1.0
    heads: int = 4
    # ZCA-whiten the teacher's features (mean and covariance over `whiten_images` train images): every direction of
    # the teacher's feature space then weighs the same in the loss, not only its few high-variance ones
    whiten: bool = False
    whiten_images: int = 512

    def __post_init__(self) -> None:
        if self.whiten_images <= 0:
            raise ConfigError(f"[align] whiten_images={self.whiten_images} must be positive")


@dataclass
class ModelRecipe:
    init: str = "scratch"  # "scratch" or a local HF LLM folder
    tokenizer: str | None = None  # tokenizer folder; None with scratch = train a BPE on the recipe's data
    vocab_size: int = 1024  # for a scratch tokenizer
    decoder: dict[str, Any] = field(default_factory=dict)  # DecoderConfig fields (scratch) or overrides (experts)
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields
    encoder: dict[str, Any] | None = None  # EncoderConfig fields: makes the encoder-based baseline
    encoder_init: str = "random"  # "random", or "pretrain": train the ViT on the data first (LLaVA's CLIP stand-in)
    encoder_steps: int = 300


@dataclass
class Recipe:
    name: str
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    align: AlignConfig | None = None
    stages: list[StageConfig] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name!r} has no [[stages]]")
        if any(stage.align for stage in self.stages) and self.align is None:
            raise ConfigError(f"recipe {self.name!r}: a stage sets align = true but there is no [align] table")


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> Recipe:
    values = dict(values)
    model = _build(ModelRecipe, values.pop("model", {}), f"{where} [model]")
    align = values.pop("align", None)
    align = _build(AlignConfig, align, f"{where} [align]") if align is not None else None
    stages = [_build(StageConfig, stage, f"{where} stage {i}") for i, stage in enumerate(values.pop("stages", []))]
    return _build(Recipe, {**values, "model": model, "align": align, "stages": stages}, where)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by file path, or by name from the recipes shipped with monovlm (eve, evev2, solo, llava)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
        raise ConfigError(f"recipe {name_or_path!r} not found (looked at {path}); shipped recipes: {shipped}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    return recipe_from_dict(values, where=str(path))
