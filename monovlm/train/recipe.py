"""Training recipes as TOML files: the data files, the model to build, the teacher for EVE's align loss, and the
stages.

A stage names its data, its template, what trains, its learning rates and its length. Stages run in order, each
starting from the previous one's weights with a fresh optimizer and schedule (as EVE's separate stage scripts do).
Everything not written in the file takes the dataclass default below, and unknown keys are errors that name the key,
so a typo never silently falls back to a default.

The data files are named once, in the `[data]` table (LLaVA's two-file layout: captions for pre-alignment and
pre-training, conversations for instruction tuning); a stage reads them as `data = "{captions}"` / `"{instruct}"`, so
pointing a recipe at other files is one change. Any value can be overridden from the command line, torchtune style:
`--set stages.instruct.steps=2000 --set model.init=path/to/llm` (`apply_overrides`: the value is read as TOML and
checked against the field's type; unknown keys are refused with the valid ones listed). `resolve_data` checks, before
any training, that every file a recipe reads is in the data folder.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.config import TEMPLATES, ConfigError, DecoderConfig, EncoderConfig, VisionConfig
from monovlm.data.yes_no import YES_NO_MODES

PARTS = ("embedder", "encoder", "projector", "decoder", "experts", "align", "attention", "pre_buffer",
         "visual_qa")


LOSS_NORMS = ("token", "sample")
TEACHER_QUESTION_KINDS = (False, True, "yes/no", "open")  # a stage's teacher_questions: none, all, or one kind


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
    # "none", or "prior": each answer token's loss weighted by how badly the model predicts it with a blank image,
    # (1 - p_blind) ** prior_power, mean 1 (PRIOR-style: the tokens the image must supply lead; see train/prior.py)
    loss_weighting: str = "none"
    prior_power: float = 1.0
    pack: bool = False  # pack samples into rows of max_length tokens
    # merge one-question records of an image into one multi-turn sample (LLaVA style); with a list of data files,
    # true/false for all of them or a list with one flag per file
    group_by_image: bool | list[bool] = False
    # with group_by_image: each question-answer turn of a merged conversation sees the image and itself only, at the
    # positions it has alone, so no turn reads the other answers (in VQA data they often give the next one away); the
    # loss of the single questions, the image read once (Processor.isolated_turns)
    isolate_turns: bool = False
    group_by_length: bool = False  # batches of samples of similar length (less padding; LLaVA's group_by_length)
    max_length: int = 512
    align: bool = False  # add EVE's patch-align loss (needs [align] in the recipe)
    # add the auxiliary loss of [visual_qa]: a small head answers the stage's short-answer questions from the
    # embedder's visual tokens (train/visual_qa.py)
    visual_qa: bool = False
    # training-time augmentation: each image translated by up to this many pixels (drawn per image and step from the
    # seed; the uncovered border repeats the edge), so a patch embedder meets each shape at every offset to its patch
    # grid. Answers about position within a few pixels would change: keep it 0 for such data
    image_shift: int = 0
    eval_every: int = 0  # optimizer steps between evals (0 = only at the end of the stage)
    # yes/no questions: "grouped" (as the data has them), "singles" (taken out of the image-grouped conversations and
    # read as samples of their own), "balanced" (singles, re-sampled so each question wording's answers are equally
    # frequent: the wording then predicts nothing), "weighted" (as the data has them, each reply's loss weighted so
    # each wording's yes and no weigh the same) or "open" (left out: the questions the wording cannot answer, where
    # only looking lowers the loss); see monovlm/data/yes_no.py
    yes_no: str = "grouped"
    # at this share of a question-answer stage, one more eval: model vs blind per answer type, warning about any type
    # answered no better than with a blank image (the plateau of a model that does not look); 0 turns it off
    blind_check: float = 0.5
    # also read the questions the "qa" teacher asked of this stage's images and answered itself ([align]
    # teacher_questions, teacher_open_questions; RUN/teacher/questions.json), merged with each image's own questions
    # as the data's are; with yes_no = "open", its open ones, and its yes/no ones with [align] teacher_yes_share =
    # "even" (the wording then predicts none of them). "yes/no" or "open": only those of the teacher's questions
    teacher_questions: bool | str = False
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end of the stage)
    init_experts: bool = False  # copy language weights into the vision experts at the start of this stage
    # weight of the next-token loss: 0 makes a distillation-only stage (BREEN's pre-alignment, HoVLE's first stage),
    # which then needs align = true or text_distill > 0, or a visual-QA-only stage (visual_qa = true alone: the decoder
    # does not run, the embedder learns the data's answers first); such a stage is not evaluated
    lm_weight: float = 1.0
    # HoVLE: the weight of a loss (1 - cos) pulling each text token's state after the pre-buffer (the holistic
    # embedding, [model.decoder] pre_buffer_layers) towards its own input embedding, the vector the LLM reads for it
    text_distill: float = 0.0
    # weight of look supervision (train/look.py): the answer position's attention over the image at decoder layer
    # `look_layer` (None: the middle one) pulled towards where the "qa" teacher's lookup head looks for the same
    # question. Needs isolate_turns and [align] teacher_head = "lookup"
    look: float = 0.0
    look_layer: int | None = None
    # V2PE's training: each micro-batch's visual tokens advance the position by a step drawn from this list (V2PE:
    # 1, 1/2, 1/4, ... 1/256), so the model serves any of them; the saved model keeps [model.decoder]
    # visual_position_step (`monovlm eval --visual-position-step` evaluates others)
    position_steps: list[float] | None = None
    # TokenFLEX's training: each image's token grid pooled by a factor drawn from this list (e.g. [1, 2]: all its
    # tokens, or about a quarter), drawn per image path and seed; the model then serves [model.vision] token_pool of
    # any of them (`monovlm eval --token-pool` evaluates each)
    token_pools: list[int] | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.yes_no not in YES_NO_MODES:
            raise ConfigError(f"stage {self.name!r}: yes_no={self.yes_no!r} is not one of {YES_NO_MODES}")
        if self.teacher_questions not in TEACHER_QUESTION_KINDS:
            raise ConfigError(f"stage {self.name!r}: teacher_questions={self.teacher_questions!r} is not one of "
                              f"{TEACHER_QUESTION_KINDS}")
        if not 0.0 <= self.blind_check <= 1.0:
            raise ConfigError(f"stage {self.name!r}: blind_check={self.blind_check!r} must be a share between 0 and 1")
        unknown = [p for p in self.train if p not in PARTS]
        if unknown:
            raise ConfigError(f"stage {self.name!r}: unknown part(s) {unknown}; parts are {PARTS}")
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError(f"stage {self.name!r}: steps, batch_size and grad_accum must be positive")
        if self.template not in TEMPLATES:  # caught at load time, not when the stage starts hours later
            raise ConfigError(f"stage {self.name!r}: template {self.template!r} is not one of {TEMPLATES}")
        self._check_data()
        if self.isolate_turns is not False and (self.isolate_turns is not True or not any(
                flag for _, _, flag in self.data_files)):
            raise ConfigError(f"stage {self.name!r}: isolate_turns = {self.isolate_turns!r} needs true/false and "
                              "group_by_image = true (it lays out the conversations group_by_image merges)")
        if isinstance(self.image_shift, bool) or not isinstance(self.image_shift, int) or self.image_shift < 0:
            raise ConfigError(f"stage {self.name!r}: image_shift = {self.image_shift!r} must be a whole number of "
                              "pixels, 0 or more")
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"stage {self.name!r}: loss_norm {self.loss_norm!r} is not one of {LOSS_NORMS}")
        if self.loss_weighting not in ("none", "prior") or self.prior_power < 0:
            raise ConfigError(f"stage {self.name!r}: loss_weighting {self.loss_weighting!r} is not none or prior, or "
                              f"prior_power {self.prior_power} is negative")
        if self.position_steps is not None and (not self.position_steps or not all(
                isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= 1
                for step in self.position_steps)):
            raise ConfigError(f"stage {self.name!r}: position_steps {self.position_steps!r} must be a non-empty list "
                              "of steps in (0, 1]")
        if self.token_pools is not None and (not self.token_pools or not all(
                type(pool) is int and pool >= 1 for pool in self.token_pools)):
            raise ConfigError(f"stage {self.name!r}: token_pools {self.token_pools!r} must be a non-empty list of "
                              "integers >= 1")
        if self.look < 0:
            raise ConfigError(f"stage {self.name!r}: look = {self.look} must be >= 0")
        if self.look > 0 and self.isolate_turns is not True:
            raise ConfigError(f"stage {self.name!r}: look = {self.look} reads each question's own turn: it needs "
                              "group_by_image = true and isolate_turns = true")
        if self.lm_weight < 0 or self.text_distill < 0:
            raise ConfigError(f"stage {self.name!r}: lm_weight ({self.lm_weight}) and text_distill "
                              f"({self.text_distill}) must be >= 0")
        if self.lm_weight == 0 and not self.align and self.text_distill == 0 and not self.visual_qa:
            raise ConfigError(f"stage {self.name!r}: lm_weight = 0 leaves no loss; set align = true, text_distill or "
                              "visual_qa = true")
        if self.align and "align" not in self.train:
            self.train = [*self.train, "align"]
        if self.visual_qa and "visual_qa" not in self.train:
            self.train = [*self.train, "visual_qa"]

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


ALIGN_TARGETS = ("patches", "queries")
TEACHER_YES_SHARES = ("data", "even")
TEACHER_HEADS = ("film", "lookup")  # the "qa" teacher's classifier heads (train/vit_qa.py)


@dataclass
class AlignConfig:
    teacher: str = "vit"  # "vit" (monovlm's own, pretrained on the data), "hf:PATH" (CLIP/SigLIP), "features:PATH"
    # how the "vit" teacher is pretrained: "mae" (masked patch prediction on the images of the recipe's data files:
    # any data) or "labels" (the synthetic scenes' dense colour/shape/word labels: `monovlm data synth` data only)
    teacher_objective: str = "mae"
    # the "qa" objective's classifier head: "film" (the question scales every patch feature, then a max-pool) or
    # "lookup" (the question's query attends over the patches: features a decoder's attention can look up)
    teacher_head: str = "film"
    teacher_steps: int = 300  # pretraining steps of the "vit" teacher
    teacher_lr: float = 2e-3
    teacher_seed: int = 0  # the "vit" teacher's init and data order; apart from the recipe's seed (one teacher serves
    # runs of every seed), set to see how much the teacher's pretraining varies
    teacher_width: int = 128
    teacher_depth: int = 3  # transformer layers; 0 with teacher_stem = "cnn" (the CNN's features alone)
    teacher_heads: int = 4
    teacher_stem: str = "patch"  # the "vit" teacher's patch stem: "patch", "conv" or "cnn" (see EncoderConfig.stem)
    teacher_stem_depth: int = 1  # "conv": 3×3 convs per halving; more see a wider area per patch (whole shapes)
    # the "vit" teacher's patch side in pixels; None = the model's patch_size. It must divide the model's pixels per
    # token (so the student's images patchify exactly); a teacher patch of one whole token (e.g. 8 for eve's 4×2)
    # costs ~4× less per pretraining step than a 4 px one
    teacher_patch_size: int | None = None
    layers: list[int] | None = None  # decoder layers to align; None = EVE's every-4th-layer rule
    # what is aligned: "patches" (EVE: each grid token to the teacher's feature at its place) or "queries" (BREEN:
    # the learnable query tokens of [model.vision] query_grids to the teacher's features pooled to each query grid)
    target: str = "patches"
    loss: str = "cosine"
    weight: float = 1.0
    heads: int = 4
    # ZCA-whiten the teacher's features (mean and covariance over `whiten_images` train images): every direction of
    # the teacher's feature space then weighs the same in the loss, not only its few high-variance ones
    whiten: bool = False
    whiten_images: int = 512
    # the student's patch stem starts as the pretrained "vit" teacher's (its weights and BatchNorm statistics): the
    # tokens hold what the teacher learnt from step 0. Needs the same stem, patch side and width on both sides
    # ([model.vision] stem = teacher_stem, patch_size = teacher_patch_size, embedder_width = teacher_width)
    init_stem: bool = False
    # with teacher_objective = "qa": after its pretraining the teacher asks each training image this many yes/no
    # questions drawn from the other images' (a yes/no question can be asked of any image; an open one presumes what
    # it names) and answers them itself; the answers it gives with at least `teacher_confidence` are kept, in each
    # wording's own share of "yes" (the data's prior stays as it was), in RUN/teacher/questions.json for the stages
    # that set teacher_questions = true. More questions whose answer only the image gives, the teacher's labels
    teacher_questions: int = 0
    teacher_confidence: float = 0.9
    # the share of "yes" kept in each wording of the teacher's questions: "data" (the wording's own in the data) or
    # "even" (half: the wording predicts none of the teacher's answers, so a stage with yes_no = "open" can read
    # them among the questions only the image answers)
    teacher_yes_share: str = "data"
    # also this many open questions (short answers other than yes/no: colours, kinds) drawn from the other images' and
    # answered by the teacher, each kept when it gives its answer with at least `teacher_confidence`: more questions
    # only the image answers, for the stages that read open ones (a stage with yes_no = "open" reads these and, with
    # teacher_yes_share = "even", the yes/no ones)
    teacher_open_questions: int = 0

    @property
    def asks_questions(self) -> bool:
        """The "qa" teacher asks questions of the images after its pretraining (RUN/teacher/questions.json)."""
        return self.teacher_questions > 0 or self.teacher_open_questions > 0

    def teacher_encoder(self) -> EncoderConfig:
        """The "vit" teacher's shape."""
        return EncoderConfig(width=self.teacher_width, depth=self.teacher_depth, heads=self.teacher_heads,
                             stem=self.teacher_stem, stem_depth=self.teacher_stem_depth)

    def __post_init__(self) -> None:
        if self.whiten_images <= 0:
            raise ConfigError(f"[align] whiten_images={self.whiten_images} must be positive")
        if self.target not in ALIGN_TARGETS:
            raise ConfigError(f"[align] target={self.target!r} is not one of {ALIGN_TARGETS}")
        if self.teacher_questions < 0 or self.teacher_open_questions < 0 or not 0.0 < self.teacher_confidence <= 1.0:
            raise ConfigError(f"[align] teacher_questions={self.teacher_questions} and teacher_open_questions="
                              f"{self.teacher_open_questions} must be >= 0 and teacher_confidence="
                              f"{self.teacher_confidence} a probability in (0, 1]")
        if self.teacher_head not in TEACHER_HEADS:
            raise ConfigError(f"[align] teacher_head={self.teacher_head!r} is not one of {TEACHER_HEADS}")
        if self.teacher_head != "film" and (self.teacher != "vit" or self.teacher_objective != "qa"):
            raise ConfigError(f"[align] teacher_head={self.teacher_head!r} is the head of a \"vit\" teacher with "
                              f"teacher_objective = \"qa\" (this one: teacher={self.teacher!r}, "
                              f"teacher_objective={self.teacher_objective!r})")
        if self.teacher_yes_share not in TEACHER_YES_SHARES:
            raise ConfigError(f"[align] teacher_yes_share={self.teacher_yes_share!r} is not one of "
                              f"{TEACHER_YES_SHARES}")
        if self.asks_questions and (self.teacher != "vit" or self.teacher_objective != "qa"):
            raise ConfigError(f"[align] teacher_questions={self.teacher_questions}, teacher_open_questions="
                              f"{self.teacher_open_questions}: only a \"vit\" teacher with "
                              f"teacher_objective = \"qa\" answers questions (this one: teacher={self.teacher!r}, "
                              f"teacher_objective={self.teacher_objective!r})")


@dataclass
class ModelRecipe:
    init: str = "scratch"  # "scratch" or a local HF LLM folder
    tokenizer: str | None = None  # tokenizer folder; None with scratch = train a BPE on the recipe's data
    vocab_size: int = 1024  # for a scratch tokenizer
    decoder: dict[str, Any] = field(default_factory=dict)  # DecoderConfig fields (scratch) or overrides (experts)
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields
    encoder: dict[str, Any] | None = None  # EncoderConfig fields: makes the encoder-based baseline
    # the baseline ViT's start (LLaVA starts from a pretrained CLIP): "random"; "mae": pretrained by masked patch
    # prediction on the images of the recipe's data files (any data); "labels": on the synthetic
    # scenes' pixel labels (scenes.json: `monovlm data synth` data only)
    encoder_init: str = "random"
    encoder_steps: int = 300

    def __post_init__(self) -> None:
        # checked here, not first when the model is built: a typo fails at load time, before any data is read
        for table, config in (("decoder", DecoderConfig), ("vision", VisionConfig), ("encoder", EncoderConfig)):
            unknown = sorted(set(getattr(self, table) or {}) - {f.name for f in dataclasses.fields(config)})
            if unknown:
                raise ConfigError(f"[model.{table}]: unknown {config.__name__} field(s) {unknown}; known: "
                                  f"{sorted(f.name for f in dataclasses.fields(config))}")


_MISSING = object()  # a key a table does not have (None is a value)

# what the stages that read the captions file do when the data folder has none (QA data only)
NO_CAPTIONS = ("error", "instruct", "skip")
DATA_FILES = ("captions", "instruct")
OVER_MAX_SKIPPED = ("error", "warn")  # the [data] files a stage's `data` names as "{captions}" and "{instruct}"


@dataclass
class DataConfig:
    """The data files, named once for all stages: LLaVA JSON/JSONL, relative to the data root (`--data`)."""

    captions: str = "captions.json"  # image-caption pairs, e.g. LLaVA-Pretrain's blip_laion_cc_sbu_558k.json
    instruct: str = "instruct.json"  # conversations about images, e.g. LLaVA-v1.5's llava_v1_5_mix665k.json
    # the folder each file's image paths are relative to, itself relative to the data root (default: the file's own
    # folder); LLaVA-Pretrain's paths start under its images/ folder, LLaVA-v1.5's under the data root. A stage's own
    # image_root wins
    captions_image_root: str | None = None
    instruct_image_root: str | None = None
    # without the captions file: "error" (stop before training, naming it); "instruct" (the caption stages read the
    # instruction file instead: each image with its conversation's last answer as the caption, the plain template's
    # reading); "skip" (the caption stages are left out, and with them what they would teach)
    no_captions: str = "error"
    # the share of a stage's samples that may be unusable (missing or broken images, malformed records, too long)
    # before the run stops: "error" stops it naming the reasons, "warn" says so loudly once and trains on. A stage
    # with no usable sample at all always stops.
    max_skipped: float = 0.05
    over_max_skipped: str = "error"
    # worker processes per rank that read, decode, resize, tokenize and collate micro-batches while the model trains
    # (same batches as 0 workers; 0 reads in the training process). "auto": min(4, c - 1), c being the cores of the
    # process shared among its machine's ranks, and 0 when c <= 2, where the model already keeps both cores busy
    num_workers: int | str = "auto"
    prefetch: int = 2  # micro-batches each worker reads ahead (DataLoader's prefetch_factor)

    def __post_init__(self) -> None:
        # `type(...) is int`: a TOML `true` is a bool, which Python would also take for an int
        if self.num_workers != "auto" and (type(self.num_workers) is not int or self.num_workers < 0):
            raise ConfigError(f"[data] num_workers={self.num_workers!r} must be \"auto\" or an integer >= 0")
        if type(self.prefetch) is not int or self.prefetch < 1:
            raise ConfigError(f"[data] prefetch={self.prefetch!r} must be an integer >= 1")
        if self.no_captions not in NO_CAPTIONS:
            raise ConfigError(f"[data] no_captions={self.no_captions!r} is not one of {NO_CAPTIONS}")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise ConfigError(f"[data] max_skipped={self.max_skipped!r} must be a share between 0 and 1")
        if self.over_max_skipped not in OVER_MAX_SKIPPED:
            raise ConfigError(f"[data] over_max_skipped={self.over_max_skipped!r} is not one of {OVER_MAX_SKIPPED}")
        for key in DATA_FILES:
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"[data] {key} must be a file name, got {getattr(self, key)!r}")


FSDP_PARAM_DTYPES = ("float32", "bfloat16")


@dataclass
class VisualQAConfig:
    """The auxiliary objective of the stages with visual_qa = true (train/visual_qa.py)."""

    weight: float = 0.5  # times the head's mean cross-entropy, added to the stage's loss
    images: int = 16  # images per micro-batch, each with all its short-answer questions
    # where the head reads the image: 0, the embedder's visual tokens; d >= 1, their states after decoder block d
    # (each image run through the decoder alone), so the decoder's own image states must hold the answers
    depth: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.images <= 0 or self.depth < 0:
            raise ConfigError(f"[visual_qa] weight={self.weight} and depth={self.depth} must be >= 0 and "
                              f"images={self.images} positive")


@dataclass
class Recipe:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    align: AlignConfig | None = None
    visual_qa: VisualQAConfig = field(default_factory=VisualQAConfig)
    stages: list[StageConfig] = field(default_factory=list)
    description: str = ""
    # activation checkpointing per decoder block: activations of one layer kept for the backward instead of all of
    # them, for about one more forward of compute (same loss and gradients; `monovlm train --dry-run` shows the memory)
    activation_checkpointing: bool = False
    # torch.compile of each training step's decoder blocks and loss (the embedder, the teacher and the align loss stay
    # eager): the same loss and gradients to float rounding, faster after the first step, which compiles. DDP, not
    # FSDP. A run may resume with it switched (see RUNNING_KEYS)
    compile: bool = False
    # --strategy fsdp only. fsdp_param_dtype = "bfloat16": each block's parameters are gathered in bf16 for its forward
    # and backward and the gradients reduced in fp32 (FSDP2's MixedPrecisionPolicy; the sharded parameters and AdamW
    # states stay fp32): half the gathered weights' memory and traffic, and no autocast copies of the weights.
    # fsdp_cpu_offload: the sharded parameters, gradients and AdamW states live in CPU memory, each block's copied to
    # the device for its forward and backward (FSDP2's CPUOffloadPolicy; the optimizer step runs on the CPU)
    fsdp_param_dtype: str = "float32"
    fsdp_cpu_offload: bool = False
    # the KEY=VALUE overrides applied over the recipe file, in order: a record of how this recipe was made (the values
    # above already include them)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name!r} has no [[stages]]")
        if any(stage.align for stage in self.stages) and self.align is None:
            raise ConfigError(f"recipe {self.name!r}: a stage sets align = true but there is no [align] table")
        shifted = [stage.name for stage in self.stages if stage.align and stage.image_shift]
        if shifted and self.align.teacher.startswith("features:"):
            raise ConfigError(f"recipe {self.name!r}: stage(s) {shifted} shift their images (image_shift) but the "
                              "align teacher's features are precomputed for the unshifted images; use image_shift = 0 "
                              "there, or a teacher that reads pixels (vit, hf:PATH)")
        asking = [stage.name for stage in self.stages if stage.teacher_questions]
        if asking and (self.align is None or not self.align.asks_questions):
            raise ConfigError(f"recipe {self.name!r}: stage(s) {asking} read the teacher's questions "
                              "(teacher_questions = true) but [align] teacher_questions and teacher_open_questions are "
                              "0: set how many questions the teacher asks of each image")
        open_asking = [stage.name for stage in self.stages if stage.teacher_questions in (True, "yes/no")
                       and stage.yes_no == "open" and (stage.teacher_questions == "yes/no"
                                                       or not self.align.teacher_open_questions)]
        if open_asking and self.align.teacher_yes_share != "even":
            raise ConfigError(f"recipe {self.name!r}: stage(s) {open_asking} leave the yes/no questions out (yes_no = "
                              "\"open\") and would read only the teacher's yes/no ones, whose answers keep each "
                              "wording's prior: set [align] teacher_yes_share = \"even\", or teacher_open_questions")
        looking = [stage.name for stage in self.stages if stage.look > 0]
        if looking and (self.align is None or self.align.teacher_head != "lookup"):
            raise ConfigError(f"recipe {self.name!r}: stage(s) {looking} set look > 0, which reads where the \"qa\" "
                              "teacher's lookup head looks: set [align] teacher = \"vit\", teacher_objective = "
                              "\"qa\" and teacher_head = \"lookup\"")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):  # overrides and resume checks address stages by name
            raise ConfigError(f"recipe {self.name!r}: stage names must be unique, got {names}")
        if self.fsdp_param_dtype not in FSDP_PARAM_DTYPES:
            raise ConfigError(f"recipe {self.name!r}: fsdp_param_dtype={self.fsdp_param_dtype!r} is not one of "
                              f"{FSDP_PARAM_DTYPES}")


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _with_data_files(values: dict[str, Any], data: DataConfig, where: str) -> dict[str, Any]:
    """A stage's values with "{captions}"/"{instruct}" in its `data` replaced by the [data] table's file names and,
    unless it names its own, the image root of the file it reads (a stage has one image root: its [data] files must
    agree on it)."""
    roots = set()

    def file_name(name):
        if isinstance(name, str) and name.startswith("{") and name.endswith("}"):
            if name[1:-1] not in DATA_FILES:
                raise ConfigError(f"{where}: data {name!r} names no [data] file; use "
                                  + " or ".join("{%s}" % key for key in DATA_FILES) + ", or a file name")
            roots.add(getattr(data, f"{name[1:-1]}_image_root"))
            return getattr(data, name[1:-1])
        return name

    values = dict(values)
    if "data" in values:
        values["data"] = ([file_name(n) for n in values["data"]] if isinstance(values["data"], list)
                          else file_name(values["data"]))
    if values.get("image_root") is None and roots - {None}:
        if len(roots) > 1:
            raise ConfigError(f"{where}: its [data] files have different image roots {sorted(roots, key=str)}; "
                              "a stage reads its images from one (set the stage's image_root)")
        values["image_root"] = roots.pop()
    return values


def recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> Recipe:
    values = dict(values)
    data = _build(DataConfig, values.pop("data", {}), f"{where} [data]")
    model = _build(ModelRecipe, values.pop("model", {}), f"{where} [model]")
    align = values.pop("align", None)
    align = _build(AlignConfig, align, f"{where} [align]") if align is not None else None
    visual_qa = _build(VisualQAConfig, values.pop("visual_qa", {}), f"{where} [visual_qa]")
    stages = []
    for i, stage in enumerate(values.pop("stages", [])):
        stage_where = f"{where} stage {i}" + (f" ({stage['name']!r})" if isinstance(stage, dict) and "name" in stage
                                              else "")
        if not isinstance(stage, dict):
            raise ConfigError(f"{stage_where}: a stage is a table ([[stages]]), got {stage!r}")
        stages.append(_build(StageConfig, _with_data_files(stage, data, stage_where), stage_where))
    return _build(Recipe, {**values, "data": data, "model": model, "align": align, "visual_qa": visual_qa,
                           "stages": stages}, where)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


# ---------------------------------------------------------------------------------------------------------------
# overrides: --set KEY=VALUE

# the recipe's tables and the dataclass whose fields are each one's keys
TABLES: dict[tuple[type, str], type] = {
    (Recipe, "data"): DataConfig, (Recipe, "model"): ModelRecipe, (Recipe, "align"): AlignConfig,
    (Recipe, "visual_qa"): VisualQAConfig,
    (ModelRecipe, "decoder"): DecoderConfig, (ModelRecipe, "vision"): VisionConfig,
    (ModelRecipe, "encoder"): EncoderConfig,
}
# decoder keys about the visual tokens (modality experts, NEO's in-image attention, native RoPE and pre-buffer,
# V2PE's position step): they hold with an HF init too, on top of the LLM's own config (pre_buffer_layers then adds that many layers)
VISUAL_DECODER_KEYS = ("expert_norms", "expert_attention", "expert_mlp", "image_attention", "visual_position_step",
                       "native_rope", "rope_theta_hw", "pre_buffer_layers")
NOT_SETTABLE = {Recipe: ("stages", "overrides"), StageConfig: ("name",)}  # addressed otherwise / a record only


def settable_keys(cls: type) -> dict[str, Any]:
    """{key: its type} of the keys `--set` may change in a table whose keys are `cls`'s fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in NOT_SETTABLE.get(cls, ())}


def type_name(hint) -> str:
    """A field's type as a user reads it: "int", "str or none", "list[str]"."""
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "none"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
        return isinstance(value, list) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:  # TOML's 1 is an int; a float field takes it
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def parse_value(raw: str, hint, key: str) -> Any:
    """The text after `=` as a value of the field's type: read as TOML (`2000`, `2e-4`, `true`, `[2, 1]`,
    `"quoted text"`); for a field that takes a string, unquoted text that is not TOML is the string itself
    (`model.init=path/to/llm`, `align.teacher=hf:path/to/siglip`)."""
    text = raw.strip()
    try:
        value = tomllib.loads(f"value = {text}")["value"]
        parsed = True
    except tomllib.TOMLDecodeError:
        value, parsed = None, False
    if parsed and _matches(value, hint):
        return float(value) if hint is float else value
    if _matches("text", hint) and text and text[0] not in "\"'[":  # "{captions}" is bare text too
        return text
    raise ConfigError(f"--set {key}={raw}: {key} takes {type_name(hint)}, and {raw!r} is not one")


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A recipe's TOML values with `KEY=VALUE` overrides applied in order (a new dict; `values` is not changed).

    KEY is a dotted path: `seed`, `data.captions`, `model.init`, `model.decoder.hidden_size`, `align.teacher`, or
    `stages.NAME.KEY` (a stage by its name; `stages.*.KEY` sets it in every stage). VALUE is parsed as TOML and
    checked against the field's type (`parse_value`). A table that the recipe does not have yet is added (e.g.
    `align.teacher` in a recipe without [align]). Unknown keys and mistyped values are ConfigErrors that name the key
    and list the valid keys at that level; the recipe built from the result checks everything else.

    `model.init=PATH` on a recipe file that builds a scratch decoder replaces that decoder: the file's [model.decoder]
    shape keys give way to the HF model's own config (its VISUAL_DECODER_KEYS stay, and so do decoder keys set with --set)."""
    values = json.loads(json.dumps(values))  # a deep copy; TOML values are JSON values
    model = values.get("model") if isinstance(values.get("model"), dict) else {}
    file_scratch = model.get("init", "scratch") == "scratch"
    file_shape = [k for k in model.get("decoder") or {} if k not in VISUAL_DECODER_KEYS]
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: write KEY=VALUE, e.g. stages.instruct.steps=2000")
        parts = key.split(".")
        if parts[0] == "stages":
            _set_stage_value(values, parts, raw, key)
        else:
            _set_table_value(values, Recipe, parts, raw, key, "")
            if parts[:2] == ["model", "decoder"] and len(parts) == 3 and parts[2] in file_shape:
                file_shape.remove(parts[2])  # set on the command line: kept (the build says if it cannot be)
    decoder = values.get("model", {}).get("decoder")
    if file_scratch and values.get("model", {}).get("init", "scratch") != "scratch" and decoder:
        values["model"]["decoder"] = {k: v for k, v in decoder.items() if k not in file_shape}
    return values


def _set_table_value(table: dict, cls: type, parts: list[str], raw: str, key: str, prefix: str) -> None:
    keys = settable_keys(cls)
    name = parts[0]
    if name not in keys:
        valid = [prefix + k for k in keys] + (["stages.NAME.KEY"] if cls is Recipe else [])
        raise ConfigError(f"--set {key}: unknown key {prefix + name!r}; valid keys here: {', '.join(valid)}")
    sub = TABLES.get((cls, name))
    if sub is not None:
        if len(parts) == 1:
            raise ConfigError(f"--set {key}: {prefix + name} is a table; set one of its keys: "
                              + ", ".join(f"{prefix}{name}.{k}" for k in settable_keys(sub)))
        if not isinstance(table.get(name), dict):
            table[name] = {}
        _set_table_value(table[name], sub, parts[1:], raw, key, f"{prefix}{name}.")
        return
    if len(parts) > 1:
        raise ConfigError(f"--set {key}: {prefix + name} is a value ({type_name(keys[name])}), not a table")
    table[name] = parse_value(raw, keys[name], key)


def _set_stage_value(values: dict, parts: list[str], raw: str, key: str) -> None:
    stages = [s for s in values.get("stages", []) if isinstance(s, dict)]
    names = [str(s.get("name")) for s in stages]
    if len(parts) != 3:
        raise ConfigError(f"--set {key}: a stage's key is stages.NAME.KEY (stages: {', '.join(names)}; "
                          "stages.*.KEY sets every stage)")
    _, name, field_name = parts
    chosen = stages if name == "*" else [s for s in stages if s.get("name") == name]
    if not chosen:
        raise ConfigError(f"--set {key}: the recipe has no stage {name!r}; stages: {', '.join(names)} "
                          "(or * for every stage)")
    keys = settable_keys(StageConfig)
    if field_name not in keys:
        raise ConfigError(f"--set {key}: unknown stage key {field_name!r}; stage keys: {', '.join(keys)}")
    value = parse_value(raw, keys[field_name], key)
    for stage in chosen:
        stage[field_name] = json.loads(json.dumps(value))  # each stage its own list


# ---------------------------------------------------------------------------------------------------------------
# loading, describing

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The TOML file of a recipe given by path or by the name of a shipped one."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"recipe {str(name_or_path)!r} not found (looked at {path}); shipped recipes: "
                          f"{shipped_recipes()}")
    return path


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe by file path, or by name from the recipes shipped with monovlm (`shipped_recipes()`), with
    `KEY=VALUE` overrides applied (see `apply_overrides`) and recorded in `Recipe.overrides`."""
    path = recipe_path(name_or_path)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    recipe = recipe_from_dict(apply_overrides(values, overrides), where=str(path))
    recipe.overrides = [*recipe.overrides, *overrides]
    return recipe


def describe_recipe(recipe: Recipe, source: str | Path | None = None) -> str:
    """What `monovlm recipes NAME` prints: the recipe's files, its stages and every key `--set` can change, with its
    value and type."""
    lines = [f"{recipe.name}: {recipe.description}" + (f"  ({source})" if source else ""), ""]
    read = {file for stage in recipe.stages for file, _, _ in stage.data_files}
    lines.append("files ([data], relative to --data; LLaVA JSON/JSONL):")
    for key in DATA_FILES:
        file = getattr(recipe.data, key)
        users = [stage.name for stage in recipe.stages if file in [f for f, _, _ in stage.data_files]]
        lines.append(f"  data.{key} = {json.dumps(file)}  " + (f"read by {', '.join(users)}" if users else
                                                               "(read by no stage)"))
    others = sorted(read - {recipe.data.captions, recipe.data.instruct})
    if others:
        lines.append(f"  other files the stages read: {', '.join(others)}")
    for key in DATA_FILES:
        image_root = _value_text(getattr(recipe.data, f"{key}_image_root"), f"none (the folder of data.{key})")
        lines.append(f"  data.{key}_image_root = {image_root}")
    lines.append(f"  data.no_captions = {json.dumps(recipe.data.no_captions)}  (without the captions file: "
                 + " | ".join(NO_CAPTIONS) + ")")
    lines += ["", "stages (in order; each from the previous one's weights, with a fresh optimizer):"]
    width = max(len(stage.name) for stage in recipe.stages)
    for i, stage in enumerate(recipe.stages, 1):
        files = " + ".join(f"{file}" + (" grouped by image" if grouped else "") + (f" ×{repeat}" if repeat > 1 else "")
                           for file, repeat, grouped in stage.data_files)
        lines.append(f"  {i}. {stage.name:<{width}}  {files}  ({stage.template}); trains {', '.join(stage.train)}; "
                     f"{stage.steps} steps × {stage.batch_size} samples, lr {stage.lr:g}"
                     + ("; align loss" if stage.align else "")
                     + (f"; visual QA loss ×{recipe.visual_qa.weight:g}" if stage.visual_qa else "")
                     + ("; no next-token loss" if stage.lm_weight == 0 else "")
                     + (f"; text distillation ×{stage.text_distill:g}" if stage.text_distill else "")
                     + (f"; visual position steps {stage.position_steps}" if stage.position_steps else "")
                     + (f"; token pools {stage.token_pools}" if stage.token_pools else "")
                     + (f"; yes/no questions: {stage.yes_no}" if stage.yes_no != "grouped" else ""))
    lines += ["", "keys --set KEY=VALUE changes (VALUE is TOML: 2000, 2e-4, true, [\"a.json\", \"b.json\"]; bare "
              "text for strings):"]
    values = recipe_to_dict(recipe)
    for key, hint in settable_keys(Recipe).items():
        if (Recipe, key) not in TABLES:
            lines.append(f"  {key} = {_value_text(values[key])}  ({type_name(hint)})")
    for key in ("data", "model", "align", "visual_qa"):
        table = values.get(key)
        sub = TABLES[(Recipe, key)]
        if table is None:
            lines.append(f"  {key}.KEY: the recipe has no [{key}] table; setting a key adds one with the defaults. "
                         "KEY: " + ", ".join(f"{k} ({type_name(h)})" for k, h in settable_keys(sub).items()))
            continue
        for name, hint in settable_keys(sub).items():
            nested = TABLES.get((sub, name))
            if nested is None:
                lines.append(f"  {key}.{name} = {_value_text(table[name])}  ({type_name(hint)})")
                continue
            given = table.get(name) or {}
            shown = ", ".join(f"{k}={_value_text(v)}" for k, v in given.items())
            lines.append(f"  {key}.{name}.FIELD: any {nested.__name__} field ({shown or 'none set'}); fields: "
                         + ", ".join(settable_keys(nested)))
    stage_keys = settable_keys(StageConfig)
    lines.append(f"  stages.NAME.KEY (NAME: {', '.join(stage.name for stage in recipe.stages)}, or * for every "
                 "stage); KEY: " + ", ".join(f"{k} ({type_name(h)})" for k, h in stage_keys.items()))
    return "\n".join(lines)


def _value_text(value: Any, none: str = "none") -> str:
    return none if value is None else json.dumps(value)



# ---------------------------------------------------------------------------------------------------------------
# the recipe on a data folder

def resolve_data(recipe: Recipe, data_root: str | Path, log=None) -> Recipe:
    """The recipe as it runs on `data_root`, checked before any training (a new Recipe; `recipe` is not changed).

    Without the captions file, the stages that read it follow `data.no_captions` ("instruct": they read the
    instruction file; "skip": they are left out; `log`, if given, is told which). Then every file a stage reads, and
    every image folder it names, must exist: one FileNotFoundError names all that are missing, the stages that read
    them, and the folder layout the recipe expects."""
    from monovlm.data.shards import is_data_source  # a data file, or a shard folder (`monovlm data shard`)

    root = Path(data_root)
    captions = recipe.data.captions
    reads_captions = [s.name for s in recipe.stages if captions in [f for f, _, _ in s.data_files]]
    recipe = dataclasses.replace(recipe, stages=list(recipe.stages))
    if reads_captions and not is_data_source(root / captions) and recipe.data.no_captions != "error":
        recipe.stages = _without_captions(recipe)
        if log is not None:
            what = (f"read {recipe.data.instruct} instead" if recipe.data.no_captions == "instruct"
                    else "are left out")
            log(f"{root / captions} does not exist: stage(s) {', '.join(reads_captions)} {what} "
                f"(data.no_captions = {recipe.data.no_captions!r})")
    missing: dict[str, list[str]] = {}
    for stage in recipe.stages:
        for file, _, _ in stage.data_files:
            if not is_data_source(root / file):
                missing.setdefault(file, []).append(stage.name)
        if stage.image_root and not (root / stage.image_root).is_dir():
            missing.setdefault(stage.image_root + "/", []).append(stage.name)
    if missing:
        raise FileNotFoundError(_layout_message(recipe, root, missing))
    return recipe


def _without_captions(recipe: Recipe) -> list[StageConfig]:
    """The stages with the captions file replaced by the instruction file, or removed (and a stage that read nothing
    else with it), as `data.no_captions` says."""
    captions, instruct = recipe.data.captions, recipe.data.instruct
    stages = []
    for stage in recipe.stages:
        rows = stage.data_files  # [(file, repeat, grouped)]
        if captions not in [file for file, _, _ in rows]:
            stages.append(stage)
        elif recipe.data.no_captions == "instruct":
            # the stage's images move with its file: the captions' image root was the stage's only as theirs
            image_root = (recipe.data.instruct_image_root if stage.image_root == recipe.data.captions_image_root
                          else stage.image_root)
            stages.append(dataclasses.replace(stage, image_root=image_root,
                                              data=instruct if isinstance(stage.data, str) else
                                              [instruct if f == captions else f for f in stage.data]))
        else:
            kept = [row for row in rows if row[0] != captions]
            if kept:
                stages.append(dataclasses.replace(
                    stage, data=[f for f, _, _ in kept], repeat=[r for _, r, _ in kept] if stage.repeat else None,
                    group_by_image=([g for _, _, g in kept] if isinstance(stage.group_by_image, list)
                                    else stage.group_by_image)))
    if not stages:
        raise ConfigError(f"recipe {recipe.name!r}: every stage reads only {captions}, so data.no_captions = 'skip' "
                          "leaves nothing to train; use 'instruct' or give the captions file")
    return stages


def _layout_message(recipe: Recipe, root: Path, missing: dict[str, list[str]]) -> str:
    captions, instruct = recipe.data.captions, recipe.data.instruct
    image = '"image": "images/0001.jpg"'
    examples = {
        captions: ("image-caption pairs: [{" + image + ', "conversations": [{"from": "human", "value": "<image>"}, '
                   '{"from": "gpt", "value": "A red circle above a blue square."}]}, ...]'),
        instruct: ("conversations about images: [{" + image + ', "conversations": [{"from": "human", "value": '
                   '"<image>\\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."}, ...]}, ...]'),
    }
    files = list(dict.fromkeys(f for stage in recipe.stages for f, _, _ in stage.data_files))
    roots = sorted({s.image_root for s in recipe.stages if s.image_root})
    images = " ".join(f"{r}/" for r in roots) or "images/"
    width = max(len(f) for f in files + [images])
    lines = [f"recipe {recipe.name!r} ({recipe.description}) cannot run on {root}: missing "
             + "; ".join(f"{file} (read by {', '.join(stages)})" for file, stages in missing.items()) + ".",
             "It reads this layout (LLaVA JSON or JSONL, or a shard folder of `monovlm data shard`; image paths "
             "relative to the JSON file's folder"
             + (f" or to the image root set for it: {images}" if roots else "") + "):", f"  {root}/"]
    for file in files:
        mark = "  <- missing" if file in missing else ""
        lines.append(f"    {file:<{width}}  {examples.get(file, 'LLaVA records')}{mark}")
    lines.append(f"    {images:<{width}}  the image files")
    hints = [f"{file} is a folder without shards.json: not a shard folder, or `monovlm data shard` did not finish"
             for file in missing if (root / file).is_dir() and not file.endswith("/")]
    if set(missing) & {captions, instruct}:
        hints.append("files of other names: --set data.captions=FILE --set data.instruct=FILE")
    if captions in missing:
        hints.append("no captions (QA data only): --set data.no_captions=instruct (the caption stages read "
                     f"{instruct}) or --set data.no_captions=skip (they are left out)")
    return "\n".join(lines + hints)


READING_KEYS = ("num_workers", "prefetch")  # [data] keys that may change between a run and its resume
RUNNING_KEYS = ("compile", "fsdp_cpu_offload")  # top-level keys of how a step runs (same results to float rounding)


def recipe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the recipe given now differs from the one a run recorded (both as `recipe_to_dict` gives them), one
    "KEY: RUN's value in the run, NOW's value now" per differing key, stages by name. The `overrides` record is not
    compared (the values are), and stages after the recorded ones are no difference: a resumed run trains them next."""
    recorded, current = json.loads(json.dumps(recorded)), json.loads(json.dumps(current))  # tuples as lists
    for values in (recorded, current):
        values.pop("overrides", None)
        for how_run in RUNNING_KEYS:
            values.pop(how_run, None)
        for how_read in READING_KEYS:  # how the data is read, not what is trained: results are identical
            values.get("data", {}).pop(how_read, None)
    old_stages, new_stages = recorded.pop("stages", []), current.pop("stages", [])
    differences = _differences(recorded, current, "")
    for index, old in enumerate(old_stages):
        if index >= len(new_stages):
            differences.append(f"stages: the run has stage {old.get('name')!r} (number {index + 1}), the recipe now "
                               f"ends before it")
            continue
        new = new_stages[index]
        label = f"stages.{old.get('name')}" if old.get("name") == new.get("name") else f"stages[{index}]"
        differences += _differences(old, new, label + ".")
    return differences


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {_show(a)} in the run, {_show(b)} now")
    return found


def _show(value: Any) -> str:
    return "(not set)" if value is _MISSING else json.dumps(value)
