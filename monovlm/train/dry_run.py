"""A dry run of a recipe: what it builds and what a step costs, before any data is read.

`dry_run(recipe)` builds the model the recipe asks for on the meta device (no weights are allocated and no tokenizer
is trained: a scratch model takes the recipe's `vocab_size`, an HF init reads its config.json and tokenizer only)
and reports, per part (`parts.part_of`), the parameters that train and those frozen; per stage, the tokens, visual
tokens and training FLOPs of one optimizer step (`flops.flops_per_token` and `flops.training_flops`, as the trainer
logs them) and an estimate of the peak memory of one device. With `steps > 0` it then runs that many optimizer
steps (forward, backward, clip, AdamW) of one stage on random inputs of the recipe's shapes, on a randomly
initialised copy of the model, and reports the measured step time and peak memory beside the estimate.

Assumptions of the plan: every row is `max_length` tokens long with one image at `max_pixels` (the most a stage can
hold; real batches are shorter), and every text token carries a label (the most the output head can cost).

The memory estimate per device (bytes; P = parameters of the trained module — model and align head —, T = those
that train in the stage, S = world_size under FSDP, else 1; b = bytes of the autocast dtype, 4 without autocast;
N = tokens of one micro-batch, batch_size × max_length; fp32 residual stream, r = 4):
- weights: 4·P / S fp32 masters, plus the frozen teacher's 4·P_teacher on every device;
- gradients: 4·T / S;  AdamW: 8·T / S (two fp32 moments), plus 4·T / S of temporaries while it steps;
- weight casts under autocast: b·P_matmul, the low-precision copies of the matmul weights that autocast keeps for
  the forward and the backward, counted unsharded (FSDP gathers a layer's weights before casting them);
- decoder activations, per layer per token: 2·r·C (the inputs the two RMSNorms save) + 3·b·C (the normed inputs cast
  for q/k/v, gate and up) + b·(3·H·D + 2·Hkv·D) (SDPA's q, k, v and output, the output projection's input) + 4·H
  (SDPA's log-sum-exp) + 4·b·I (gate, SiLU, up and their product), with C the width, H/Hkv the query/key-value
  heads of size D and I the MLP width. Fused SDPA kernels are assumed: no T×T attention matrix is kept (a kernel
  that cannot take the batch's explicit mask — padding, packing, bidirectional images — together with grouped
  key/value heads falls back to the math one, which keeps H·T² probabilities a row: not estimated). With
  checkpointing a layer keeps only its input (r·C) and one layer's full set is recomputed in the backward;
- plus one layer's full activations of gradients in flight during the backward, and around the decoder: the final
  norm's input (r·C a token), the output head on labelled tokens ((b + 8)·V a token: the logits, their fp32 copy's
  log-softmax and its gradient), and the embedder on visual tokens (its input pixels in fp32 and the autocast
  copy, (4 + b)·3·p² for p = pixels_per_token, and 3·b·C for its conv/linear outputs).
Not estimated: the visual QA objective (train/visual_qa.py), a baseline vision encoder's activations, the modality
experts' gather/scatter copies, the allocator's fragmentation and the CUDA context. Measured against it on the CPU (a
3-5M-parameter decoder, 2-4 rows of 256-512 tokens, float32 and bf16 autocast, checkpointing on and off): measured /
estimated 1.0-1.2 (tests/test_dry_run.py holds it within 0.5-2). Not yet compared on a GPU. On the CPU the first
steps also load kernels and thread pools (some 25 MiB of resident memory), so a toy model's measured peak reads
several times its estimate.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from monovlm.config import ConfigError, DecoderConfig, EncoderConfig, ProcessorConfig, VisionConfig, VLMConfig
from monovlm.data.images import num_image_tokens, resized_size
from monovlm.data.layout import TokenLayout
from monovlm.model.vlm import IGNORE_INDEX, EncoderFreeVLM, labelled_cross_entropy
from monovlm.train.flops import autocast_dtype, flops_per_token, training_flops
from monovlm.train.parts import param_groups, part_of, pre_buffer_of, set_trainable
from monovlm.train.recipe import VISUAL_DECODER_KEYS, Recipe, StageConfig
from monovlm.train.trainer import TrainModule  # the trainer's layout (model, aligner): names and parts as trained

STRATEGIES = ("ddp", "fsdp")
PART_ORDER = ("embedder", "encoder", "projector", "pre_buffer", "decoder", "experts", "align", "teacher")
RESIDUAL_BYTES = 4  # the residual stream stays fp32 under autocast (fp32 embeddings plus low-precision updates)


# -------------------------------------------------------------------------------------------------------------------
# the model the recipe builds, without data


def planned_config(recipe: Recipe) -> VLMConfig:
    """The VLMConfig `build.build_model` arrives at, read from the recipe alone: a scratch decoder with the recipe's
    vocab_size (the BPE trained on the data has at most that many tokens, its special tokens included), an HF init
    from its config.json and tokenizer (grown by the chat and image tokens as the build grows it)."""
    decoder_values = dict(recipe.model.decoder)
    visual = {key: decoder_values.pop(key) for key in VISUAL_DECODER_KEYS if key in decoder_values}
    if recipe.model.init == "scratch":
        vocab = recipe.model.vocab_size
        special = {"image": vocab - 1}  # any id inside the vocabulary: counts and FLOPs do not depend on it
        decoder = DecoderConfig(vocab_size=vocab, special_tokens=special, **decoder_values, **visual)
    else:
        decoder = _hf_decoder_config(recipe, visual)
    encoder = EncoderConfig(**recipe.model.encoder) if recipe.model.encoder is not None else None
    return VLMConfig(decoder=decoder, vision=VisionConfig(**recipe.model.vision),
                     processor=ProcessorConfig(template=recipe.stages[-1].template), encoder=encoder)


def _hf_decoder_config(recipe: Recipe, visual: dict) -> DecoderConfig:
    from monovlm.data.processor import resolve_template
    from monovlm.model.hf import load_config
    from monovlm.tokenizer import CHAT_SPECIAL_TOKENS, IMAGE_SPECIAL_TOKENS, Tokenizer

    if recipe.model.decoder.keys() - set(VISUAL_DECODER_KEYS):
        raise ConfigError(f"[model.decoder] may only set {', '.join(VISUAL_DECODER_KEYS)} when init is an HF model; got "
                          f"{recipe.model.decoder}")
    base = load_config(recipe.model.init)
    tokenizer = Tokenizer.from_folder(recipe.model.tokenizer or recipe.model.init)
    if any(resolve_template(stage.template, tokenizer) == "chatml" for stage in recipe.stages):
        tokenizer.add_special_tokens(CHAT_SPECIAL_TOKENS)
    ids = tokenizer.add_special_tokens(IMAGE_SPECIAL_TOKENS)
    vocab = base.vocab_size
    if max(ids.values()) >= vocab:  # as `add_image_special_tokens` grows the model
        vocab = max(tokenizer.vocab_size, max(ids.values()) + 1)
    added = visual.get("pre_buffer_layers", 0)  # fresh layers in front of the LLM's (Decoder.add_pre_buffer)
    return DecoderConfig.from_dict({**base.to_dict(), "vocab_size": vocab, "num_layers": base.num_layers + added,
                                    "special_tokens": {**base.special_tokens, **ids}, **visual})


@dataclass
class TeacherPlan:
    params: int  # parameters of the network the teacher runs (0: precomputed features or none)
    feature_dim: int | None  # None: unknown without reading the features file
    note: str = ""
    in_autocast_dtype: bool = False  # an "hf:" teacher: its weights are stored in the run's autocast dtype


def plan_teacher(recipe: Recipe, vision: VisionConfig, data_root: Path | None) -> TeacherPlan:
    """The align teacher's size and feature width, from settings and config files only (no weights, no images)."""
    align = recipe.align
    if align is None:
        return TeacherPlan(0, None)
    spec = align.teacher
    if spec == "vit":
        from monovlm.model.teachers import teacher_vision
        from monovlm.model.vit import ViT

        config = align.teacher_encoder()
        with torch.device("meta"):
            vit = ViT(config, teacher_vision(vision, align.teacher_patch_size).patch_size)
        return TeacherPlan(count(vit), align.teacher_width, "its pretraining before the stages is not planned")
    if spec.startswith("hf:"):
        return _hf_teacher_plan(Path(spec[3:]).expanduser())
    if spec.startswith("features:"):
        path = Path(spec[len("features:"):]).expanduser()
        if not path.is_absolute():
            if data_root is None:
                return TeacherPlan(0, None, f"{spec}: a relative path needs the data folder; align head not counted")
            path = Path(data_root) / path
        from monovlm.model.teachers import PrecomputedTeacher

        return TeacherPlan(0, PrecomputedTeacher(path).feature_dim, "precomputed features (header read only)")
    raise ConfigError(f"unknown teacher {spec!r}: use 'vit', 'hf:PATH' or 'features:PATH'")


def _hf_teacher_plan(folder: Path) -> TeacherPlan:
    """A CLIP/SigLIP folder: feature width from config.json, vision-tower parameters from the safetensors headers."""
    import json

    from safetensors import safe_open

    values = json.loads((folder / "config.json").read_text())
    vision = values.get("vision_config", values)
    params = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = [name for name in f.keys() if "text_model" not in name and "logit_" not in name]
            params += sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    return TeacherPlan(params, int(vision["hidden_size"]), "HF vision tower (text tower not loaded), its weights "
                       "stored in the autocast dtype", in_autocast_dtype=True)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_plan_module(config: VLMConfig, recipe: Recipe, teacher: TeacherPlan,
                      device: str | torch.device) -> TrainModule:
    """The VLM and, with an [align] table and a known teacher width, EVE's align head, randomly initialised on
    `device` ("meta": shapes only)."""
    from monovlm.model.align import PatchAligner, eve_layers

    with torch.device(device):
        model = EncoderFreeVLM(config)
        aligner = None
        if recipe.align is not None and teacher.feature_dim is not None:
            layers = recipe.align.layers if recipe.align.layers is not None else eve_layers(config.decoder.num_layers)
            aligner = PatchAligner(config.decoder.hidden_size, teacher.feature_dim, len(layers),
                                   heads=recipe.align.heads, loss=recipe.align.loss, weight=recipe.align.weight)
    return TrainModule(model, aligner)


# -------------------------------------------------------------------------------------------------------------------
# tokens and memory of a stage


@dataclass
class StageShape:
    """One micro-batch of a stage as planned: rows of max_length tokens, one image at max_pixels a row."""

    rows: int
    length: int
    visual_per_image: int  # placeholders of one image at max_pixels (0: no image fits max_length)
    image_size: tuple[int, int]  # (H, W) of that image after the resize policy

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def visual_tokens(self) -> int:
        return self.rows * self.visual_per_image

    @property
    def labelled_tokens(self) -> int:
        return self.tokens - self.visual_tokens


def stage_shape(stage: StageConfig, vision: VisionConfig) -> StageShape:
    side = math.isqrt(vision.max_pixels)  # a square picture at the pixel budget: the most tokens of common shapes
    visual = num_image_tokens(side, side, vision)
    size = resized_size(side, side, vision)
    if visual + 2 > stage.max_length:  # the processor skips a sample whose image leaves no room for text
        visual = 0
    return StageShape(stage.batch_size, stage.max_length, visual, size)


@dataclass
class MemoryEstimate:
    """Bytes one device holds at its peak (see the module docstring for each term)."""

    weights: float
    gradients: float
    optimizer: float
    weight_casts: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.weight_casts + self.activations


def layer_activation_bytes(config: DecoderConfig, dtype_bytes: int) -> float:
    """Bytes one decoder layer saves for the backward per token, without checkpointing."""
    width, heads, kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
    head_dim, inner = config.resolved_head_dim, config.intermediate_size
    return (2 * RESIDUAL_BYTES * width + 3 * dtype_bytes * width
            + dtype_bytes * (3 * heads + 2 * kv_heads) * head_dim + 4 * heads + 4 * dtype_bytes * inner)


def activation_bytes(config: VLMConfig, shape: StageShape, dtype_bytes: int, checkpointing: bool) -> float:
    """Activation bytes of one micro-batch at the peak of its backward (module docstring)."""
    decoder = config.decoder
    layer = layer_activation_bytes(decoder, dtype_bytes) * shape.tokens
    if checkpointing:
        layers = decoder.num_layers * RESIDUAL_BYTES * decoder.hidden_size * shape.tokens + layer
    else:
        layers = decoder.num_layers * layer
    in_flight = layer
    final_norm = RESIDUAL_BYTES * decoder.hidden_size * shape.tokens
    head = (dtype_bytes + 8) * decoder.vocab_size * shape.labelled_tokens
    pixels = 3 * config.vision.pixels_per_token**2
    embedder = ((4 + dtype_bytes) * pixels + 3 * dtype_bytes * decoder.hidden_size) * shape.visual_tokens
    return layers + in_flight + final_norm + head + embedder


def matmul_params(module: TrainModule) -> int:
    """Parameters that run as matmul weights (what autocast casts): all but the token embedding lookup, which
    counts only when it doubles as the tied output head; norms and biases are counted too (small)."""
    decoder = module.model.decoder
    total = count(module)
    return total - (decoder.embed_tokens.weight.numel() if decoder.lm_head is not None else 0)


def dtype_bytes(dtype: str) -> int:
    """Bytes of one activation element in the autocast dtype ("float32": no autocast)."""
    return torch.finfo(getattr(torch, dtype)).bits // 8


def estimate_memory(module: TrainModule, teacher_params: int, trainable: int, config: VLMConfig, shape: StageShape,
                    dtype: str, strategy: str, world_size: int, checkpointing: bool, fsdp_param_dtype: str = "float32",
                    fsdp_cpu_offload: bool = False, teacher_bytes: int = 4) -> MemoryEstimate:
    shards = world_size if strategy == "fsdp" else 1
    casts = 0 if dtype == "float32" else dtype_bytes(dtype) * matmul_params(module)
    on_device = 0.0 if strategy == "fsdp" and fsdp_cpu_offload else 1.0  # offloaded shards live in CPU memory
    if strategy == "fsdp" and (fsdp_param_dtype != "float32" or fsdp_cpu_offload):
        # the weights a block runs with are gathered (in fsdp_param_dtype) for it and the next one, prefetched; with
        # parameters gathered in bf16, autocast has no fp32 weights to copy
        gathered_bytes = 4 if fsdp_param_dtype == "float32" else dtype_bytes(fsdp_param_dtype)
        block = max(count(layer) for layer in module.model.decoder.layers)
        casts = (casts if fsdp_param_dtype == "float32" else 0) + 2 * gathered_bytes * block
    return MemoryEstimate(
        weights=on_device * 4 * count(module) / shards + teacher_bytes * teacher_params,
        gradients=on_device * 4 * trainable / shards,
        optimizer=on_device * 12 * trainable / shards,
        weight_casts=casts,
        activations=activation_bytes(config, shape, dtype_bytes(dtype), checkpointing),
    )


# -------------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class PartCount:
    part: str
    params: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


@dataclass
class StagePlan:
    name: str
    trains: list[str]
    tokens: int  # per optimizer step, all devices
    visual_tokens: int
    images: int
    flops_per_token: float
    flops: float  # per optimizer step, all devices
    memory: MemoryEstimate  # per device
    activations_checkpointed: float  # the activation term with checkpointing (what turning it on would give)
    activations_plain: float  # ... and without


@dataclass
class Measurement:
    stage: str
    steps: int
    device: str
    step_seconds: list[float]
    peak_bytes: float
    how: str  # what the peak is

    @property
    def step_time(self) -> float:
        """The last step's seconds (the first one also pays for allocation and warm-up)."""
        return self.step_seconds[-1]


@dataclass
class DryRunReport:
    recipe: str
    strategy: str
    world_size: int
    dtype: str
    checkpointing: bool
    parts_stage: str  # the stage whose trainable flags `parts` shows
    parts: list[PartCount]
    stages: list[StagePlan]
    measured: Measurement | None = None
    measured_estimate: float | None = None  # the estimated peak of the measured stage, on the measuring device
    notes: list[str] = field(default_factory=list)

    def part(self, name: str) -> PartCount:
        return next(p for p in self.parts if p.part == name)

    def text(self) -> str:
        lines = [f"dry run of recipe {self.recipe!r}: {self.strategy} × {self.world_size} device(s), "
                 f"{self.dtype} {'autocast' if self.dtype != 'float32' else '(no autocast)'}, activation "
                 f"checkpointing {'on' if self.checkpointing else 'off'}", "",
                 f"parameters (trainable in stage {self.parts_stage!r}):",
                 f"  {'part':<10} {'params':>12} {'trainable':>12} {'frozen':>12}"]
        for p in self.parts:
            lines.append(f"  {p.part:<10} {_count(p.params):>12} {_count(p.trainable):>12} {_count(p.frozen):>12}")
        total = PartCount("total", sum(p.params for p in self.parts), sum(p.trainable for p in self.parts))
        lines.append(f"  {'total':<10} {_count(total.params):>12} {_count(total.trainable):>12} "
                     f"{_count(total.frozen):>12}")
        lines += ["", "per optimizer step (tokens and FLOPs over all devices; memory per device, estimated):",
                  f"  {'stage':<14} {'tokens':>9} {'visual':>9} {'TFLOPs':>9} {'weights':>9} {'grads':>9} "
                  f"{'AdamW':>9} {'casts':>9} {'activ.':>9} {'peak':>9}  activ. with / without checkpointing"]
        for s in self.stages:
            m = s.memory
            lines.append(f"  {s.name[:14]:<14} {s.tokens:>9,} {s.visual_tokens:>9,} {s.flops / 1e12:>9.3g} "
                         + " ".join(f"{_bytes(v):>9}" for v in (m.weights, m.gradients, m.optimizer,
                                                               m.weight_casts, m.activations, m.total))
                         + f"  {_bytes(s.activations_checkpointed)} / {_bytes(s.activations_plain)}")
        if self.measured is not None:
            m = self.measured
            ratio = f" ({m.peak_bytes / self.measured_estimate:.2f}× the estimate)" if self.measured_estimate else ""
            lines += ["", f"measured: stage {m.stage!r}, {m.steps} step(s) on {m.device}, random inputs: "
                          f"{m.step_time:.3f} s a step (last), peak {_bytes(m.peak_bytes)} ({m.how}) vs "
                          f"{_bytes(self.measured_estimate or 0)} estimated for one device{ratio}"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# -------------------------------------------------------------------------------------------------------------------
# the dry run


def dry_run(recipe: Recipe, data_root: Path | None = None, steps: int = 0, strategy: str = "ddp",
            world_size: int = 1, dtype: str = "auto", checkpointing: bool = False, stage: int | str = 0,
            device: str | None = None) -> DryRunReport:
    """Plan `recipe` (see the module docstring) and, with `steps > 0`, run that many optimizer steps of `stage`
    (index or name; its trainable parts also head the parameter table) on random inputs on `device` (default: CUDA
    when there is one, else the CPU). `dtype` is the trainer's autocast dtype ("auto" resolved for `device` as the
    trainer resolves it). `data_root` is read only to find a relative `features:` teacher file."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    why = None
    if dtype == "auto":
        dtype, why = autocast_dtype(torch.device(device).type)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r} is not auto, float32, bfloat16 or float16")
    chosen = _stage_index(recipe, stage)
    config = planned_config(recipe)
    teacher = plan_teacher(recipe, config.vision, data_root)
    module = build_plan_module(config, recipe, teacher, "meta")
    plans = [plan_stage(module, config, s, teacher, strategy, world_size, dtype, checkpointing,
                        recipe.fsdp_param_dtype, recipe.fsdp_cpu_offload) for s in recipe.stages]
    trainable = set_trainable(module, recipe.stages[chosen].train)
    parts = part_counts(module, trainable, teacher.params)
    report = DryRunReport(recipe.name, strategy, world_size, dtype, checkpointing, recipe.stages[chosen].name,
                          parts, plans, notes=plan_notes(recipe, config, teacher, strategy))
    if why is not None:
        report.notes.append(f"autocast {dtype} ({why}; dtype auto, resolved for {device})")
    if steps > 0:
        report.measured = measure_steps(recipe, config, teacher, recipe.stages[chosen], steps, dtype, checkpointing,
                                        device)
        single = plan_stage(module, config, recipe.stages[chosen], teacher, "ddp", 1, dtype, checkpointing)
        report.measured_estimate = single.memory.total
        if world_size > 1 and strategy == "fsdp":
            report.notes.append("the measured run is one unsharded process: compare it with the one-device estimate "
                                "shown beside it, not with the FSDP column")
    return report


def _stage_index(recipe: Recipe, stage: int | str) -> int:
    names = [s.name for s in recipe.stages]
    if isinstance(stage, str):
        if stage not in names:
            raise ConfigError(f"recipe {recipe.name!r} has no stage {stage!r}; stages: {names}")
        return names.index(stage)
    if not -len(names) <= stage < len(names):
        raise ConfigError(f"recipe {recipe.name!r} has {len(names)} stage(s); no stage {stage}")
    return stage % len(names)


def part_counts(module: TrainModule, trainable: dict[str, int], teacher_params: int) -> list[PartCount]:
    """Parameters per part (those present), trainable as `set_trainable` left them; the teacher is always frozen."""
    totals: dict[str, int] = {}
    pre_buffer = pre_buffer_of(module)
    for name, param in module.named_parameters():
        part = part_of(name, pre_buffer)
        totals[part] = totals.get(part, 0) + param.numel()
    if teacher_params:
        totals["teacher"] = teacher_params
    trained = dict(trainable)
    trained["decoder"] = trained.get("decoder", 0) + trained.pop("attention", 0)  # attention alone: of the decoder
    return [PartCount(part, totals[part], trained.get(part, 0)) for part in PART_ORDER if part in totals]


def plan_stage(module: TrainModule, config: VLMConfig, stage: StageConfig, teacher: TeacherPlan, strategy: str,
               world_size: int, dtype: str, checkpointing: bool, fsdp_param_dtype: str = "float32",
               fsdp_cpu_offload: bool = False) -> StagePlan:
    trainable = sum(set_trainable(module, stage.train).values())
    shape = stage_shape(stage, config.vision)
    micro_batches = stage.grad_accum * world_size
    tokens, visual = shape.tokens * micro_batches, shape.visual_tokens * micro_batches
    per_token = flops_per_token(module.model, stage.max_length // 2)  # the trainer's sequence-length convention
    flops = training_flops(tokens, visual, per_token, teacher.params if stage.align else 0)
    memory = estimate_memory(module, teacher.params if stage.align else 0, trainable, config, shape, dtype, strategy,
                             world_size, checkpointing, fsdp_param_dtype, fsdp_cpu_offload,
                             teacher_bytes=dtype_bytes(dtype) if teacher.in_autocast_dtype else 4)
    images = shape.rows * micro_batches if shape.visual_per_image else 0
    checkpointed, plain = (activation_bytes(config, shape, dtype_bytes(dtype), on) for on in (True, False))
    return StagePlan(stage.name, list(stage.train), tokens, visual, images, per_token, flops, memory, checkpointed,
                     plain)


def plan_notes(recipe: Recipe, config: VLMConfig, teacher: TeacherPlan, strategy: str) -> list[str]:
    notes = ["rows are planned full (max_length tokens, one image at max_pixels, every text token labelled): an "
             "upper bound for padded batches"]
    if recipe.model.init == "scratch":
        notes.append(f"scratch vocabulary planned at vocab_size = {recipe.model.vocab_size}; the BPE trained on the "
                     "data can come out smaller on a small corpus")
    for stage in recipe.stages:
        if stage_shape(stage, config.vision).visual_per_image == 0:
            notes.append(f"stage {stage.name!r}: an image at max_pixels does not fit max_length = {stage.max_length}"
                         " (planned without images)")
    if teacher.note:
        notes.append(f"teacher: {teacher.note}")
    qa_stages = [stage.name for stage in recipe.stages if stage.visual_qa]
    if qa_stages:
        notes.append(f"visual QA ({', '.join(qa_stages)}): its head (sized by the data's questions and answers) and "
                     f"its embedder pass over {recipe.visual_qa.images} more images a micro-batch are not planned")
    for stage in recipe.stages:
        if stage.visual_qa and stage.lm_weight == 0 and not stage.align and stage.text_distill == 0:
            notes.append(f"stage {stage.name!r} is visual QA only: the decoder does not run, so the tokens, FLOPs and "
                         "activations planned for it are not spent")
    if config.encoder is not None:
        notes.append("the baseline vision encoder's activations are not estimated, nor its pretraining")
    if config.decoder.has_experts:
        notes.append("modality experts: FLOPs count both copies per token (flops.py); their routing copies are not "
                     "in the activation estimate")
    if strategy == "fsdp":
        notes.append("FSDP: weights, gradients and AdamW states divided by the world size; autocast's weight casts "
                     "and activations are not")
        if recipe.fsdp_param_dtype != "float32":
            notes.append(f"FSDP: parameters gathered in {recipe.fsdp_param_dtype} (casts: two blocks' gathered "
                         "weights instead of autocast's copies)")
        if recipe.fsdp_cpu_offload:
            notes.append("FSDP: shards, gradients and AdamW states offloaded to CPU memory: host RAM, not in the "
                         "device columns above")
    return notes


# -------------------------------------------------------------------------------------------------------------------
# measured steps


def random_batch(config: VLMConfig, shape: StageShape, generator: torch.Generator, device: str
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """input_ids (B, T): text, one image's placeholders, text; labels (B, T) on every text token; images [(3, H, W)]."""
    vocab, image_id = config.decoder.vocab_size, config.image_token_id
    rows, length, visual = shape.rows, shape.length, shape.visual_per_image
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    input_ids[input_ids == image_id] = (image_id + 1) % vocab  # no stray placeholder among the text
    start = min(8, length - visual - 1) if visual else 0
    input_ids[:, start:start + visual] = image_id
    labels = torch.where(input_ids == image_id, IGNORE_INDEX, input_ids)
    height, width = shape.image_size
    images = [torch.randn(3, height, width, generator=generator).to(device) for _ in range(rows if visual else 0)]
    return input_ids.to(device), labels.to(device), images


def measure_steps(recipe: Recipe, config: VLMConfig, teacher: TeacherPlan, stage: StageConfig, steps: int, dtype: str,
                  checkpointing: bool, device: str) -> Measurement:
    """Run `steps` optimizer steps of `stage` (grad_accum micro-batches each, forward + backward under autocast,
    clip, AdamW) on random inputs; the peak memory counts everything allocated from before the model is built."""
    torch.manual_seed(recipe.seed)
    tracker = PeakTracker(device)
    module = build_plan_module(config, recipe, teacher, device)
    model = module.model.train()
    model.decoder.checkpoint_blocks = checkpointing
    set_trainable(module, stage.train)
    optimizer = torch.optim.AdamW(param_groups(module, stage.lr, stage.weight_decay), lr=stage.lr, betas=stage.betas)
    align_step = _align_step(recipe, module, stage, config, teacher, device)
    shape = stage_shape(stage, config.vision)
    generator = torch.Generator().manual_seed(recipe.seed)
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    seconds = []
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(stage.grad_accum):
            input_ids, labels, images = random_batch(config, shape, generator, device)
            with autocast:
                loss = align_step(input_ids, labels, images)
            (loss / stage.grad_accum).backward()
        if stage.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], stage.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    peak, how = tracker.peak()
    return Measurement(stage.name, steps, device, seconds, peak, how)


def _align_step(recipe: Recipe, module: TrainModule, stage: StageConfig, config: VLMConfig, teacher: TeacherPlan,
                device: str):
    """The loss of one micro-batch: mean cross-entropy, plus EVE's align loss in an align stage (a randomly initialised
    "vit" teacher runs; other teachers give random features of their width)."""
    model = module.model
    if not stage.align or module.aligner is None:
        def loss(input_ids, labels, images):
            hidden = model.hidden_states(input_ids, images or None)
            return labelled_cross_entropy(hidden, labels, model.decoder.output_weight)
        return loss
    from monovlm.model.align import HiddenCapture, eve_layers, target_alignment_loss

    align = recipe.align
    layers = align.layers if align.layers is not None else eve_layers(config.decoder.num_layers)
    features = _random_teacher(recipe, config, teacher, device)

    def loss_with_align(input_ids, labels, images):
        with HiddenCapture(model.decoder, layers) as captured:
            hidden = model.hidden_states(input_ids, images or None)
        ce = labelled_cross_entropy(hidden, labels, model.decoder.output_weight)
        if not images:
            return ce
        layouts = [TokenLayout.for_image(image, config.vision) for image in images]
        with torch.no_grad():
            teacher_features = features(images, layouts)
        vision_mask = input_ids == config.image_token_id
        return ce + target_alignment_loss(align.target, module.aligner, captured.states, vision_mask, layouts,
                                          teacher_features, config.vision.query_grids)
    return loss_with_align


def _random_teacher(recipe: Recipe, config: VLMConfig, teacher: TeacherPlan, device: str):
    align = recipe.align
    if align.teacher == "vit":
        from monovlm.model.teachers import ViTTeacher, teacher_vision
        from monovlm.model.vit import ViT

        encoder = align.teacher_encoder()
        vit = ViTTeacher(ViT(encoder, teacher_vision(config.vision, align.teacher_patch_size).patch_size).to(device))
        return lambda images, layouts: vit(images, None)
    return lambda images, layouts: [torch.randn(layout.rows, layout.cols, teacher.feature_dim, device=device)
                                    for layout in layouts]


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class PeakTracker:
    """Peak memory from now on: CUDA's peak allocated bytes, or on the CPU the growth of the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs where Linux allows; else ru_maxrss) over its size now. Memory the
    process freed earlier and reuses does not show as growth, so on the CPU this can read low."""

    def __init__(self, device: str):
        self.device = device
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.base = _status_bytes("VmRSS")
        self.reset = _reset_peak_rss()
        self.base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> tuple[float, str]:
        if self.device.startswith("cuda"):
            return float(torch.cuda.max_memory_allocated(self.device) - self.base), "CUDA max_memory_allocated"
        if self.reset and self.base is not None:
            return float(_status_bytes("VmHWM") - self.base), "CPU peak RSS growth (VmHWM)"
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return float(max(maxrss - self.base_maxrss, 0)), "CPU ru_maxrss growth (a lower bound)"


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None
