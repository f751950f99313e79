"""The training loop: one explicit loop over the recipe's stages, readable top to bottom.

Per optimizer step: fetch `grad_accum` micro-batches, count their labelled tokens across all ranks, then for each
micro-batch run forward (bf16 autocast where the machine runs it natively) and backward with the loss *summed* over
tokens and divided by that global count — so gradient accumulation and data parallelism give exactly the loss of one
big batch. (With a stage's `loss_norm = "sample"` the units are samples: each token's loss is divided by its
sample's labelled tokens and the sum by the global number of samples.) Then clip,
set the learning rate (warmup + cosine), step AdamW, log (loss, tokens/s, FLOPs, MFU; see flops.py) and maybe
evaluate or checkpoint.

A checkpoint holds the model folder plus the training state (optimizer, data position, RNG, align head); `resume`
continues from the latest one so that the loss sequence equals the uninterrupted run's exactly (tested on CPU: one
process, and 2 gloo processes under DDP and FSDP2). The optimizer state is saved unsharded and keyed by parameter
name, so a checkpoint also resumes under another strategy or world size (then equal only to float rounding).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as shape_config
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from monovlm.config import ConfigError
from monovlm.data.collate import Batch
from monovlm.data.datasets import DatasetError, read_records
from monovlm.data.images import random_shifts
from monovlm.data.processor import IGNORE_INDEX, Processor
from monovlm.files import write_folder_atomic
from monovlm.model.teachers import TEACHER_QUESTIONS_FILE
from monovlm.model.vlm import EncoderFreeVLM, labelled_cross_entropy, per_sample_token_weights
from monovlm.tokenizer import Tokenizer
from monovlm.train import checkpoint as ckpt
from monovlm.train import run_folder
from monovlm.train.build import build_model
from monovlm.train.data import BatchStream, resolve_workers, stage_dataset, stage_processor, stage_stream
from monovlm.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    gather_state,
    init_distributed,
    load_optimizer_state,
    shutdown,
    wrap,
)
from monovlm.train.flops import (
    autocast_dtype,
    flops_per_token,
    peak_cache_path,
    peak_flops,
    teacher_params,
    training_flops,
)
from monovlm.train.parts import param_groups, set_trainable
from monovlm.train.recipe import Recipe, StageConfig
from monovlm.train.schedule import apply_lr, lr_factor

# a stage's skipped share is judged once this many samples (or the whole data set, if smaller) were read
SKIP_CHECK_SAMPLES = 200


@dataclass
class TrainOptions:
    recipe: Recipe
    data_root: Path
    run_dir: Path
    resume: bool = False
    overwrite: bool = False  # a fresh run into a folder holding another run replaces it (else: refused)
    device: str | None = None
    strategy: str = "ddp"  # with torchrun: "ddp" or "fsdp"
    # autocast dtype for forward/backward ("float32" to disable; "auto": bf16 where this machine multiplies it fast,
    # see flops.autocast_dtype); weights stay fp32
    dtype: str = "auto"
    eval_data: str | None = "instruct_test.json"  # relative to data_root; QA accuracy per category
    eval_limit: int = 200
    stop_after: int | None = None  # stop after this global step (used to test resume: a simulated kill)
    keep_checkpoints: int = 2
    progress: bool = True
    measure_peak: bool = True  # the machine's matmul peak, for MFU (cached per machine: see flops.peak_flops)


@dataclass
class StepLosses:
    """One optimizer step's losses, averaged over all ranks, and what this rank read."""

    ce: float
    align: float  # the auxiliary losses but visual QA's and look supervision's, weighted
    seen_tokens: int  # non-pad tokens of this rank's micro-batches
    visual_tokens: int  # image tokens among them
    visual_qa: float = 0.0  # the visual QA head's mean cross-entropy (unweighted; 0 when off)
    visual_qa_weight: float = 0.0
    look: float = 0.0  # look supervision's mean KL (unweighted; 0 when off)
    look_weight: float = 0.0

    @property
    def total(self) -> float:
        return self.ce + self.align + self.visual_qa_weight * self.visual_qa + self.look_weight * self.look


@dataclass
class TrainResult:
    model: EncoderFreeVLM
    tokenizer: Tokenizer
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this call
    evals: list[dict[str, Any]] = field(default_factory=list)
    final_dir: Path | None = None


class TrainModule(nn.Module):
    """What the optimizer sees: the VLM plus, when EVE's align loss is on, the align head, and when a stage sets
    visual_qa, the visual QA head (both training only).

    One module so DDP/FSDP wrap everything that trains; the teacher is frozen and lives outside it.

    With `compile=True` the decoder's blocks, final norm and loss run as one `torch.compile`d region
    (`decoder_loss`); what around it is data-dependent (the image embedder over a list of images, the attention-mask
    choice, which positions carry labels, expert routing) runs eagerly and enters the region as tensors. The region is
    compiled with dynamic shapes, so batches of other lengths reuse its graph. The compile sits inside the module that
    DDP wraps: DDP's gradient hooks see ordinary parameters, and its forward stays eager."""

    def __init__(self, model: EncoderFreeVLM, aligner: nn.Module | None = None, compile: bool = False,
                 align_target: str = "patches", visual_qa_head: nn.Module | None = None, visual_qa_depth: int = 0):
        super().__init__()
        self.model = model
        self.aligner = aligner
        self.align_target = align_target  # "patches" (EVE) or "queries" (BREEN)
        self.visual_qa_head = visual_qa_head
        self.visual_qa_depth = visual_qa_depth  # where the head reads: 0 the embedder's tokens, d decoder block d
        self.visual_qa_value = None  # the last forward's visual QA cross-entropy, detached (for the log)
        self.look_value = None  # the last forward's look loss, detached (for the log)
        self.compiled_loss = compiled_decoder_loss() if compile else None

    def forward(self, batch: Batch, teacher=None, align_layers=None,
                token_weights: torch.Tensor | None = None, prior_power: float = 0.0,
                text_distill: float = 0.0, visual_qa=None, visual_qa_weight: float = 0.0,
                main: bool = True, look=None, look_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (summed cross-entropy over labelled tokens, each scaled by `token_weights` when given — and, with
        `prior_power` > 0, by PRIOR-style weights (`prior.py`) —, the auxiliary loss: align loss (or 0) plus, with
        `text_distill` > 0, that weight times HoVLE's text distillation after the pre-buffer, plus, with a
        `visual_qa` batch (`visual_qa.VisualQABatch`), `visual_qa_weight` times the visual QA head's loss on it).
        `main=False` leaves the batch's own losses out (zeros; the decoder does not run): a visual-QA-only stage.
        With `look` (`look.LookSupervision`), `look_weight` times the look loss joins the auxiliary loss."""
        self.look_value = None
        if main:
            ce_sum, auxiliary = self.main_losses(batch, teacher, align_layers, token_weights, prior_power,
                                                 text_distill, look, look_weight)
        else:
            ce_sum = auxiliary = torch.zeros((), device=batch.input_ids.device)
        self.visual_qa_value = None
        if visual_qa is not None and self.visual_qa_head is not None:
            from monovlm.train.visual_qa import visual_qa_loss

            qa_loss = visual_qa_loss(self.model, self.visual_qa_head, visual_qa, self.visual_qa_depth)
            self.visual_qa_value = qa_loss.detach()
            auxiliary = auxiliary + visual_qa_weight * qa_loss
        return ce_sum, auxiliary

    def main_losses(self, batch: Batch, teacher, align_layers, token_weights: torch.Tensor | None,
                    prior_power: float, text_distill: float, look=None,
                    look_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's own losses: `forward`'s without visual QA."""
        model = self.model
        images = batch.images or None
        if prior_power > 0:
            from monovlm.train.prior import prior_token_weights

            prior = prior_token_weights(model, batch.input_ids, batch.labels, images, batch.attention_mask,
                                        prior_power, batch.turn_ids)
            token_weights = prior if token_weights is None else token_weights * prior
        use_align = self.aligner is not None and teacher is not None and images is not None
        depths = list(align_layers) if use_align else []
        if text_distill > 0:
            depths.append(model.config.decoder.pre_buffer_layers)  # the output of the holistic embedding
        capture = look.capture(model) if look is not None else contextlib.nullcontext()
        with capture as captured:
            if self.compiled_loss is not None and look is None and bool((batch.labels[:, 1:] != IGNORE_INDEX).any()):
                ce_sum, states = self.compiled_forward(batch, token_weights, depths)
            else:  # eager; also a micro-batch without labels (its zero loss would be one more graph to compile)
                ce_sum, states = self.eager_forward(batch, token_weights, depths)
        auxiliary = ce_sum.new_zeros(())
        if look is not None:
            look_loss = look.loss(model, batch, captured.args)
            self.look_value = look_loss.detach()
            auxiliary = auxiliary + look_weight * look_loss
        if text_distill > 0:
            from monovlm.model.align import text_distillation_loss

            text_mask = batch.input_ids != model.image_token_id
            if batch.attention_mask is not None and batch.attention_mask.dim() == 2:
                text_mask = text_mask & (batch.attention_mask != 0)
            embeddings = model.decoder.embed_tokens(batch.input_ids)  # (B, T, C): what the LLM reads for text
            auxiliary = auxiliary + text_distill * text_distillation_loss(states.pop(), embeddings, text_mask)
        if not use_align:
            return ce_sum, auxiliary
        from monovlm.model.align import target_alignment_loss

        with torch.no_grad():
            teacher_features = teacher(batch.images, batch.image_keys or None)
        vision_mask = batch.input_ids == model.image_token_id
        layouts = model.image_layouts(batch.input_ids, batch.images)  # TokenFLEX: at each image's pooling
        align = target_alignment_loss(self.align_target, self.aligner, states, vision_mask, layouts, teacher_features,
                                      model.config.vision.query_grids)
        return ce_sum, auxiliary + align

    def eager_forward(self, batch: Batch, token_weights: torch.Tensor | None,
                      depths) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(summed cross-entropy, hidden states at `depths` for the align loss) through the model's own forward."""
        model = self.model
        capture = contextlib.nullcontext()
        if depths:
            from monovlm.model.align import HiddenCapture

            capture = HiddenCapture(model.decoder, depths)
        with capture as captured:
            hidden = model.hidden_states(batch.input_ids, batch.images or None, batch.attention_mask,
                                         turn_ids=batch.turn_ids)
        ce_sum = labelled_cross_entropy(hidden, batch.labels, model.decoder.output_weight, reduction="sum",
                                        token_weights=token_weights)
        return ce_sum, captured.states if depths else []

    def compiled_forward(self, batch: Batch, token_weights: torch.Tensor | None,
                         depths) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same as `eager_forward`, with the blocks, norm and loss in the compiled region: the preamble of
        `Decoder.hidden_states` (no cache) and the label selection of `labelled_cross_entropy` run here, eagerly."""
        from monovlm.model.align import HiddenCapture
        from monovlm.model.decoder import segments_of

        model, decoder = self.model, self.model.decoder
        images = batch.images or None
        x, vision_mask = model.embed(batch.input_ids, images)  # (B, T, C)
        mask = batch.attention_mask
        if batch.turn_ids is not None:  # isolated turns: their own mask and positions
            mask, positions = decoder.turn_inputs(mask, None, batch.turn_ids, vision_mask)
        else:
            positions = decoder.default_positions(segments_of(mask), x.shape[:2], None, x.device,
                                                  vision_mask)  # V2PE's and native RoPE's visual steps included
        grid = model.grid_positions(batch.input_ids, images) if decoder.config.native_rope and images else None
        inputs = decoder.layer_inputs(x, mask, positions, None, vision_mask, grid)
        # a boolean mask's count is data-dependent (a graph break); an index of the labelled targets is an input
        label_index = (batch.labels[:, 1:] != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)  # (N,)
        targets = batch.labels[:, 1:].reshape(-1).index_select(0, label_index)  # (N,)
        weights = None if token_weights is None else token_weights.reshape(-1).index_select(0, label_index)
        resolved = tuple(HiddenCapture.resolve(depth, len(decoder.layers)) for depth in depths)
        return self.compiled_loss(decoder, x, inputs, label_index, targets, weights, resolved)


def decoder_loss(decoder, x: torch.Tensor, inputs, label_index: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor | None, depths: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The compiled region of a training step: x (B, T, C) embeddings through the blocks and the final norm, then the
    output head and the cross-entropy summed over the labelled positions only — `label_index` (N,) into the flattened
    (B·(T-1)) shifted positions, `targets` (N,), optional per-token `weights` (N,). -> (summed loss, the states at
    the resolved `depths` in `HiddenCapture`'s numbering: 0 the embeddings, d the output of block d, "final" the
    normed output)."""
    states = {0: x}
    # SDPA's math form on CPU: in a dynamic-shape graph the fused CPU kernel's backward gets its input strides fixed
    # at the first length, and the next length fails a stride assertion (torch 2.13); inductor fuses the math form
    math = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext()
    with math:
        for number, block in enumerate(decoder.layers, 1):
            x = decoder.run_block(block, x, inputs, None)
            states[number] = x
    hidden = decoder.norm(x)  # (B, T, C)
    states["final"] = hidden
    labelled = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, label_index)  # (N, C)
    logits = F.linear(labelled, decoder.output_weight)  # (N, V)
    if weights is None:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        loss = (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()
    return loss, [states[depth] for depth in depths]


def compiled_decoder_loss():
    """`decoder_loss` under `torch.compile`, with dynamic shapes (batch, length and label count vary from step to
    step). Each call gets its own code object: dynamo keeps graphs and its recompile limit per code object, so the
    graphs of one run never count against another's in the same process."""
    code = decoder_loss.__code__.replace()
    own = types.FunctionType(code, decoder_loss.__globals__, decoder_loss.__name__)
    compiled = torch.compile(own, dynamic=True)

    def run(*args):
        # no duck sizing: a label count that happens to equal a fixed size (the head dim, say) would otherwise share
        # its symbol, become a constant, and recompile at the next count
        with shape_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run


def short_answer_records(records: list[dict[str, Any]], limit: int, seed: int,
                         max_words: int = 3) -> list[dict[str, Any]]:
    """Up to `limit` single-question records about one image whose answer has at most `max_words` words (what exact
    match can score), drawn with a fixed seed; each multi-turn record gives its first question."""
    import random

    usable = []
    for record in records:
        turns = record.get("conversations")
        if not isinstance(record.get("image"), str) or not isinstance(turns, list) or len(turns) < 2:
            continue
        question, answer = turns[0], turns[1]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (question, answer)):
            continue
        if question.get("from") in ("human", "user") and 0 < len(answer["value"].split()) <= max_words:
            usable.append({**record, "conversations": [question, answer]})
    random.Random(seed).shuffle(usable)
    return usable[:limit]


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def drawn_position_step(steps: list[float], seed: int, global_step: int, micro_batch: int) -> float:
    """V2PE training: the position step of one micro-batch, drawn uniformly from `steps` by (seed, step, micro-batch)
    alone, so every rank draws the same and a resumed run draws what the uninterrupted one did."""
    import random

    return random.Random(hash((seed, global_step, micro_batch))).choice(steps)


def _loss_units(batch: Batch | None, loss_norm: str) -> tuple[int, torch.Tensor | None]:
    """(what the summed loss is divided by, counted in one micro-batch: labelled tokens, or samples with a label;
    the per-token weights (B, T-1) — the "sample" norm's times the batch's own label weights — or None if all 1)."""
    if batch is None:
        return 0, None
    label_weights = None if batch.label_weights is None else batch.label_weights[:, 1:]  # aligned with targets
    if loss_norm == "sample":
        weights, samples = per_sample_token_weights(batch.labels, batch.attention_mask)
        return samples, weights if label_weights is None else weights * label_weights
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum()), label_weights


class Trainer:
    def __init__(self, options: TrainOptions):
        self.options = options
        self.recipe = options.recipe
        self.info: DistInfo = init_distributed(options.device)
        self.dtype = options.dtype  # the autocast dtype of this run ("auto" resolved for this machine)
        if self.dtype == "auto":
            self.dtype, why = autocast_dtype(self.info.device.type)
            self.log(f"autocast: {self.dtype} ({why})")
        self.run_dir = Path(options.run_dir)
        self.metrics_path = self.run_dir / run_folder.METRICS_FILE
        self.teacher = None
        self.look = None  # the running stage's look supervision (train/look.py), if it sets look > 0
        self.align_layers = None
        self.visual_qa_data = None  # visual_qa.VisualQAData when a stage sets visual_qa
        self.device_peak = None  # FLOP/s of one device, measured on the main rank (the one that logs MFU)
        self.total_flops = 0.0  # training FLOPs spent so far (see flops.py), logged with each eval
        self.mfu_warned = False
        self.skip_warned = False
        self.eval_sets: dict[str, tuple[list[dict[str, Any]], Path, str]] = {}  # stage name -> its eval records
        self.started = time.time()

    # ---------------------------------------------------------------------------------------------------------------
    # set-up

    def teacher_pretrain_dtype(self) -> torch.dtype | None:
        """The autocast dtype of a "vit" teacher's pretraining, which runs on the CPU whatever the run's device:
        bfloat16 when the run autocasts and this CPU has native bf16 matmuls, else None (float32)."""
        if self.dtype == "float32" or autocast_dtype("cpu")[0] != "bfloat16":
            return None
        return torch.bfloat16

    def log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def setup(self) -> tuple[EncoderFreeVLM, Tokenizer, dict[str, Any] | None]:
        """The model to train: from the newest checkpoint that loads (with --resume), else built fresh. Checks the
        run folder's identity first (see run_folder.py) and records it."""
        options, info = self.options, self.info
        torch.manual_seed(self.recipe.seed)
        fingerprint = run_folder.data_fingerprint(self.recipe, options.data_root)
        if options.resume:
            run_folder.check_resume(self.run_dir, self.recipe, fingerprint)
        else:
            run_folder.check_fresh(self.run_dir, options.overwrite)
        barrier(info)  # every rank has looked at the folder before the main one changes it
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not options.resume:
                run_folder.clear_run(self.run_dir)  # with --overwrite: the run that was there
            run_folder.record_identity(self.run_dir, self.recipe, fingerprint)
        self.warn_without_eval_data()
        loaded = self.load_newest_checkpoint() if options.resume else None
        if loaded is None:
            if options.resume:
                self.log(f"no checkpoint in {self.run_dir}; starting fresh")
                if info.is_main:
                    self.metrics_path.unlink(missing_ok=True)  # a fresh start: old metrics would mix with new ones
            model, tokenizer = build_model(self.recipe, options.data_root, progress=options.progress)
            state = None
        else:
            model, tokenizer, state = loaded
            if info.is_main:
                dropped = run_folder.truncate_metrics(self.metrics_path, state["global_step"])
                if dropped:
                    self.log(f"metrics.jsonl: dropped {dropped} record(s) logged after step {state['global_step']} "
                             "(those steps run again)")
        barrier(info)
        model.to(info.device)
        if options.measure_peak and info.is_main:
            peak_dtype = getattr(torch, self.dtype)
            self.device_peak = peak_flops(peak_dtype, info.device.type, peak_cache_path())
        return model, tokenizer, state

    def load_newest_checkpoint(self) -> tuple[EncoderFreeVLM, Tokenizer, dict[str, Any]] | None:
        """(model, tokenizer, training state) of the newest checkpoint that loads; a damaged one (truncated weights,
        an unreadable training state, a broken config) is passed over, saying which and why. None without
        checkpoints; an error when none of them loads."""
        candidates = ckpt.checkpoints_newest_first(self.run_dir)
        failures = []
        for folder in candidates:
            try:
                loaded = (EncoderFreeVLM.load(folder), Tokenizer.from_folder(folder), ckpt.load_train_state(folder))
            except Exception as error:  # any damage to the files; the next older checkpoint may be whole
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                failures.append(f"{folder.name} ({reason})")
                self.log(f"checkpoint {folder} does not load, passed over: {reason}")
                continue
            self.log(f"resuming from {folder}" + (f" (skipped: {', '.join(failures)})" if failures else ""))
            return loaded
        if failures:
            raise ConfigError(f"cannot resume {self.run_dir}: none of its {len(failures)} checkpoint(s) loads: "
                              + "; ".join(failures))
        return None

    def warn_without_eval_data(self) -> None:
        options = self.options
        if options.eval_data and not (options.data_root / options.eval_data).is_file():
            self.log(f"no periodic eval on held-out questions: {options.data_root / options.eval_data} does not "
                     "exist, so each question-answer stage is checked on its own short-answer questions (give a QA "
                     "file with --eval-data FILE, or --no-eval for no eval)")

    def log_fsdp_policies(self) -> None:
        recipe = self.recipe
        chosen = [f"fsdp_param_dtype = {recipe.fsdp_param_dtype}"] if recipe.fsdp_param_dtype != "float32" else []
        chosen += ["fsdp_cpu_offload = true"] if recipe.fsdp_cpu_offload else []
        if not chosen:
            return
        if self.info.enabled and self.options.strategy == "fsdp":
            self.log(f"FSDP2: {', '.join(chosen)}")
        else:
            self.log(f"{', '.join(chosen)}: applies to --strategy fsdp under torchrun only, not used in this run")

    def setup_align(self, model: EncoderFreeVLM, state: dict[str, Any] | None) -> nn.Module | None:
        align = self.recipe.align
        if align is None or not any(stage.align for stage in self.recipe.stages):
            return None  # no stage aligns: no teacher to pretrain
        if align.target == "queries" and not model.config.vision.query_grids:
            raise ConfigError("[align] target = \"queries\" needs learnable queries: set [model.vision] query_grids "
                              "(e.g. [1, 2, 4])")
        from monovlm.model.align import PatchAligner, eve_layers
        from monovlm.data.image_files import stage_sources
        from monovlm.model.teachers import build_teacher, check_stem_init, init_stem_from_teacher

        if align.init_stem:
            check_stem_init(align, model.config.vision)  # before the teacher's pretraining, not after
        # the teacher (pretrained, whitened) reads the images of the data files the recipe trains on
        self.teacher = build_teacher(align, model.config.vision, self.options.data_root, self.run_dir, self.info,
                                     progress=self.options.progress, sources=stage_sources(self.recipe.stages),
                                     hf_dtype=None if self.dtype == "float32" else getattr(torch, self.dtype),
                                     device=self.info.device, pretrain_dtype=self.teacher_pretrain_dtype())
        if align.init_stem and state is None:  # on resume the checkpoint holds the stem as trained so far
            from monovlm.model.vit import load_vit

            init_stem_from_teacher(model.embedder, load_vit(self.run_dir / "teacher").to(self.info.device))
            self.log("the embedder's patch stem starts as the teacher's ([align] init_stem)")
        num_layers = model.config.decoder.num_layers
        self.align_layers = align.layers if align.layers is not None else eve_layers(num_layers)
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.recipe.seed + 1)  # the head's init must not shift the main RNG stream
        aligner = PatchAligner(model.config.decoder.hidden_size, self.teacher.feature_dim, len(self.align_layers),
                               heads=align.heads, loss=align.loss, weight=align.weight)
        torch.set_rng_state(generator_state)
        if state is not None and state.get("aligner") is not None:
            aligner.load_state_dict(state["aligner"])
        return aligner.to(self.info.device)

    def setup_visual_qa(self, model: EncoderFreeVLM, state: dict[str, Any] | None) -> nn.Module | None:
        """The visual QA head and its data, read from the files of the stages that set visual_qa; None when none
        does."""
        stages = [stage for stage in self.recipe.stages if stage.visual_qa]
        if not stages:
            return None
        from monovlm.data.image_files import stage_sources
        from monovlm.train.visual_qa import visual_qa_data, visual_qa_head

        config = self.recipe.visual_qa
        if config.depth > model.config.decoder.num_layers:
            raise ConfigError(f"[visual_qa] depth = {config.depth}: the decoder has {model.config.decoder.num_layers} "
                              "blocks (0 reads the embedder's tokens)")
        self.visual_qa_data = visual_qa_data(self.options.data_root, stage_sources(stages), model.config.vision,
                                             config.images, self.recipe.seed)
        task = self.visual_qa_data.task
        self.log(f"visual QA: {task.questions} short-answer questions about {len(task.by_image)} images, "
                 f"{len(task.answers)} answers; {config.images} images a micro-batch, weight {config.weight:g}"
                 + (f" ({task.left_out} questions with rarer answers left out)" if task.left_out else ""))
        head = visual_qa_head(model.config.decoder.hidden_size, self.visual_qa_data, self.recipe.seed + 2)
        if state is not None and state.get("visual_qa_head") is not None:
            head.load_state_dict(state["visual_qa_head"])
        return head.to(self.info.device)

    # ---------------------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> TrainResult:
        if self.recipe.compile and self.info.enabled and self.options.strategy == "fsdp":
            # FSDP2's per-block hooks gather each block's weights; inside the compiled region they are untested
            raise ConfigError("compile = true is not supported with --strategy fsdp; use ddp, or --set compile=false")
        model, tokenizer, state = self.setup()
        model.decoder.checkpoint_blocks = self.recipe.activation_checkpointing
        aligner = self.setup_align(model, state)
        module = TrainModule(model, aligner, compile=self.recipe.compile,
                             align_target=self.recipe.align.target if self.recipe.align else "patches",
                             visual_qa_head=self.setup_visual_qa(model, state),
                             visual_qa_depth=self.recipe.visual_qa.depth)
        if self.recipe.compile:
            self.log("compile: the decoder's blocks and loss run through torch.compile (the first step compiles)")
        self.log_fsdp_policies()
        result = TrainResult(model, tokenizer)
        start_stage = state["stage"] if state is not None else 0
        global_step = state["global_step"] if state is not None else 0
        self.total_flops = state.get("flops", 0.0) if state is not None else 0.0
        if start_stage >= len(self.recipe.stages):
            self.log(f"the checkpoint has finished all {len(self.recipe.stages)} stage(s) of this recipe: nothing left "
                     "to train (to train on from it, give the recipe more stages; those run)")
        for stage_index in range(start_stage, len(self.recipe.stages)):
            stage = self.recipe.stages[stage_index]
            stage_state = state if state is not None and stage_index == start_stage else None
            global_step, stopped = self.run_stage(stage_index, stage, module, tokenizer, stage_state, global_step,
                                                  result)
            if stopped:
                return result
        final = self.run_dir / "final"
        full_state, _ = gather_state(module, None, self.info, self.options.strategy, with_optimizer=False)
        if self.info.is_main:
            model_state = {k.removeprefix("model."): v for k, v in full_state.items() if k.startswith("model.")}

            def write(folder: Path) -> None:
                model.save(folder, tokenizer, state_dict=model_state)
                shutil.copyfile(self.run_dir / run_folder.RECIPE_FILE, folder / "recipe.json")  # what made this model

            write_folder_atomic(final, write)
            self.log(f"saved the trained model to {final}")
        barrier(self.info)
        result.final_dir = final
        return result

    def run_stage(self, stage_index: int, stage: StageConfig, module: TrainModule, tokenizer: Tokenizer,
                  state: dict[str, Any] | None, global_step: int, result: TrainResult) -> tuple[int, bool]:
        options, info, model = self.options, self.info, module.model
        start_step = state["step"] if state is not None else 0
        if stage.text_distill > 0 and model.config.decoder.pre_buffer_layers == 0:
            raise ConfigError(f"stage {stage.name!r}: text_distill needs a pre-buffer (the holistic embedding whose "
                              "output it distils): set [model.decoder] pre_buffer_layers")
        if stage.init_experts and start_step == 0 and model.config.decoder.has_experts:
            model.decoder.init_experts_from_text()
        processor = stage_processor(stage, tokenizer, model.config.vision, seed=self.recipe.seed)
        model.config.processor = processor.config  # saved with the model: inference uses the last stage's template
        dataset = stage_dataset(stage, processor, options.data_root, seed=self.recipe.seed,
                                teacher_questions=self.run_dir / "teacher" / TEACHER_QUESTIONS_FILE,
                                even_teacher_answers=self.recipe.align is not None
                                and self.recipe.align.teacher_yes_share == "even")
        pad_id = tokenizer.pad_id or 0
        num_workers = resolve_workers(self.recipe.data.num_workers)
        stream = stage_stream(stage, dataset, stage.batch_size, self.recipe.seed + stage_index, pad_id, info.rank,
                              info.world_size, num_workers=num_workers,
                              prefetch=self.recipe.data.prefetch, pin_memory=info.device.type == "cuda")
        module.train()  # a resumed checkpoint loads in eval mode
        trainable = set_trainable(module, stage.train)
        wrapped = wrap(module, info, options.strategy, self.recipe.fsdp_param_dtype, self.recipe.fsdp_cpu_offload)
        optimizer = torch.optim.AdamW(param_groups(module, stage.lr, stage.weight_decay), lr=stage.lr,
                                      betas=stage.betas)
        if state is not None:
            if state["optimizer"] is not None:  # None when the checkpoint closed the previous stage
                load_optimizer_state(module, optimizer, state["optimizer"], info, options.strategy)
            stream.load_state(state["stream"])
            ckpt.restore_rng(state["rng"])
        samples_per_step = stage.batch_size * stage.grad_accum * info.world_size
        self.log(f"stage {stage_index} {stage.name!r}: {stage.steps} steps × {samples_per_step} "
                 f"samples/step on {dataset.name} ({len(dataset)} records); training "
                 + ", ".join(f"{part} ({count / 1e6:.2f}M)" for part, count in sorted(trainable.items()))
                 + (f"; read by {num_workers} worker process{'es' if num_workers > 1 else ''} per rank"
                    if num_workers else ""))
        flops_token = flops_per_token(model, stage.max_length // 2)
        teacher_param_count = teacher_params(self.teacher) if stage.align else 0
        self.look = self.look_supervision(stage, model, tokenizer)
        bar = tqdm(total=stage.steps, initial=start_step, desc=stage.name,
                   disable=not (options.progress and info.is_main), dynamic_ncols=True)
        for step in range(start_step, stage.steps):
            started = time.perf_counter()
            micro_batches = [stream.next_batch() for _ in range(stage.grad_accum)]
            losses = self.forward_backward(wrapped, model, micro_batches, stage, global_step)
            grad_norm, factor = self.optimizer_step(module, optimizer, stage, step)
            global_step += 1
            elapsed = time.perf_counter() - started
            # one collective for what every rank read: tokens (for FLOPs) and samples used and skipped
            global_seen, global_visual, skipped, read = all_reduce_sum(torch.tensor(
                [float(losses.seen_tokens), float(losses.visual_tokens), float(stream.report.skipped),
                 float(stream.report.total)]), info).tolist()
            step_flops = training_flops(global_seen, global_visual, flops_token, teacher_param_count)
            self.total_flops += step_flops
            tokens_per_s = global_seen / elapsed
            mfu = step_flops / elapsed / (self.device_peak * info.world_size) if self.device_peak else float("nan")
            result.losses.append(losses.total)
            record = {"stage": stage.name, "step": step + 1, "global_step": global_step, "loss": losses.total,
                      "ce": losses.ce, "align": losses.align, **({"visual_qa": losses.visual_qa}
                                                                  if stage.visual_qa else {}),
                      **({"look": losses.look} if stage.look > 0 else {}),
                      "lr": stage.lr * factor, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_s, "mfu": mfu, "flops": step_flops,
                      "skipped": stream.report.skipped, "elapsed_s": round(time.time() - self.started, 2)}
            self.write_metrics(record)
            self.check_skipped(stage, stream, int(skipped), int(read), stage_end=step + 1 == stage.steps)
            bar.set_postfix(loss=f"{losses.total:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=self.mfu_text(mfu),
                            refresh=False)
            bar.update(1)
            last = step + 1 == stage.steps
            check = stage.blind_check > 0 and step + 1 == max(1, round(stage.blind_check * stage.steps))
            if (stage.eval_every and (step + 1) % stage.eval_every == 0) or last or check:
                self.evaluate(model, processor, stage, global_step, result)
            stopping = options.stop_after is not None and global_step >= options.stop_after
            if (stage.save_every and (step + 1) % stage.save_every == 0) or last:
                self.save(module, tokenizer, optimizer, stream, stage_index, step + 1, global_step, last)
            if stopping:
                bar.close()
                stream.close()
                self.log(f"stopping after global step {global_step} (stop_after)")
                return global_step, True
        bar.close()
        stream.close()  # the data workers; on an error they end with the stream (daemon processes, or at collection)
        self.log(f"stage {stage.name!r} data: {stream.report.summary()}")
        return global_step, False

    def check_skipped(self, stage: StageConfig, stream: BatchStream, skipped: int, total: int,
                      stage_end: bool = False) -> None:
        """Stop a stage that has no usable sample, and one whose skipped share passes `[data] max_skipped` (or warn
        once, with `over_max_skipped = "warn"`): a wrong image folder or a broken file must not train a model on
        nothing, or on what is left of the data, without saying so. Judged once enough samples were read for the
        share to mean something, or at the stage's end. `skipped` and `total` are all ranks' reads summed, so every
        rank stops together."""
        if total == 0 or (total < min(len(stream.dataset), SKIP_CHECK_SAMPLES) and not stage_end):
            return
        data = self.recipe.data
        where = f"stage {stage.name!r} ({stream.dataset.name} under {self.options.data_root})"
        if skipped >= total:
            raise DatasetError(f"{where}: none of the {total} samples read so far is usable — "
                               f"{stream.report.summary()}")
        share = skipped / total
        if share <= data.max_skipped or (data.over_max_skipped == "warn" and self.skip_warned):
            return
        message = (f"{where}: {100 * share:.1f}% of the {total} samples read so far are unusable, more than "
                   f"[data] max_skipped = {100 * data.max_skipped:g}% — {stream.report.summary()}")
        if data.over_max_skipped == "error":
            raise DatasetError(message + "\n(fix the data, or accept the loss with --set data.max_skipped=SHARE or "
                               "--set data.over_max_skipped=warn)")
        self.skip_warned = True
        self.log("WARNING: " + message + "\n(training goes on: [data] over_max_skipped = \"warn\")")

    def forward_backward(self, wrapped: nn.Module, model: EncoderFreeVLM, micro_batches: list[Batch | None],
                         stage: StageConfig, global_step: int = 0) -> StepLosses:
        """Forward and backward over one step's micro-batches, gradients accumulated so that they equal one big
        batch's (see the module docstring); gradients are synchronised across ranks on the last micro-batch only.
        With the stage's `position_steps` (V2PE training) each micro-batch runs at its drawn step, and the model's
        own step is restored afterwards."""
        info = self.info
        units = [_loss_units(b, stage.loss_norm) for b in micro_batches]  # [(count, token weights or None)]
        local_units = sum(count for count, _ in units)
        global_units = all_reduce_sum(torch.tensor(float(local_units)), info).item()
        ce_total = torch.zeros((), device=info.device)
        align_total = torch.zeros((), device=info.device)
        qa_total = torch.zeros((), device=info.device)
        look_total = torch.zeros((), device=info.device)
        qa_weight = self.recipe.visual_qa.weight if stage.visual_qa else 0.0
        qa_module = wrapped.module if hasattr(wrapped, "module") else wrapped  # DDP's wrapper holds it as .module
        main = stage.lm_weight > 0 or stage.align or stage.text_distill > 0  # else a visual-QA-only stage
        seen_tokens = 0
        visual_tokens = 0
        own_step = model.config.decoder.visual_position_step
        for index, (batch, (_, weights)) in enumerate(zip(micro_batches, units)):
            if batch is None:
                continue
            batch = batch.to(info.device)
            if stage.image_shift:
                batch.images = random_shifts(batch.images, stage.image_shift,
                                             f"image_shift/{self.recipe.seed}/{global_step}/{index}/{info.rank}")
            weights = None if weights is None else weights.to(info.device)
            if main:  # what the decoder read (FLOPs)
                seen_tokens += batch.num_tokens
                visual_tokens += int((batch.input_ids == model.image_token_id).sum())
            sync = index == len(micro_batches) - 1 or not hasattr(wrapped, "no_sync")
            if stage.position_steps:
                model.set_visual_position_step(drawn_position_step(stage.position_steps, self.recipe.seed,
                                                                   global_step, index))
            qa_batch = self.visual_qa_data.batch(global_step, index, info.rank) if stage.visual_qa else None
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), _autocast(info.device, self.dtype):
                ce_sum, align = wrapped(batch, self.teacher if stage.align else None, self.align_layers, weights,
                                        stage.prior_power if stage.loss_weighting == "prior" else 0.0,
                                        stage.text_distill, None if qa_batch is None else qa_batch.to(info.device),
                                        qa_weight, main, look=self.look, look_weight=stage.look)
                loss = (stage.lm_weight * ce_sum * info.world_size / max(global_units, 1.0)
                        + align / stage.grad_accum)
            if loss.requires_grad:  # not in a visual-QA-only micro-batch none of whose images could be read
                loss.backward()
            ce_total += ce_sum.detach().float()
            qa_value = qa_module.visual_qa_value
            if qa_value is not None:  # logged on its own, not inside "align"
                qa_total += qa_value.float() / stage.grad_accum
                align = align - qa_weight * qa_value
            look_value = qa_module.look_value
            if look_value is not None:  # logged on its own too
                look_total += look_value.float() / stage.grad_accum
                align = align - stage.look * look_value
            align_total += align.detach().float() / stage.grad_accum
        if stage.position_steps:
            model.set_visual_position_step(own_step)
        ce_mean = all_reduce_sum(ce_total, info).item() / max(global_units, 1.0)
        align_mean = all_reduce_sum(align_total, info).item() / info.world_size
        qa_mean = all_reduce_sum(qa_total, info).item() / info.world_size
        look_mean = all_reduce_sum(look_total, info).item() / info.world_size
        return StepLosses(ce_mean, align_mean, seen_tokens, visual_tokens, qa_mean, qa_weight, look_mean, stage.look)

    def look_supervision(self, stage: StageConfig, model: EncoderFreeVLM, tokenizer: Tokenizer):
        """The stage's `look.LookSupervision` (None when its look weight is 0): the teacher's lookup head from
        RUN/teacher, the student's attention at `look_layer` (default: the middle layer)."""
        if stage.look <= 0:
            return None
        from monovlm.train.look import LookSupervision, TeacherLook

        layers = model.config.decoder.num_layers
        layer = stage.look_layer if stage.look_layer is not None else layers // 2
        if not 0 <= layer < layers:
            raise ConfigError(f"stage {stage.name!r}: look_layer = {layer} is not a layer of the {layers}-layer "
                              "decoder")
        return LookSupervision(TeacherLook(self.run_dir / "teacher", tokenizer, self.info.device), layer)

    @staticmethod
    def optimizer_step(module: TrainModule, optimizer: torch.optim.Optimizer, stage: StageConfig,
                       step: int) -> tuple[float, float]:
        """Clip, set the scheduled learning rate, step, clear the gradients. -> (gradient norm before clipping, or
        NaN without clipping; the learning-rate factor of this step)."""
        if stage.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in module.parameters() if p.requires_grad], stage.clip_grad))
        else:
            grad_norm = float("nan")
        factor = lr_factor(step, stage.warmup_steps, stage.steps, stage.min_lr_ratio)
        apply_lr(optimizer, factor)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, factor

    def mfu_text(self, mfu: float) -> str:
        """The progress bar's MFU, never above 100%; a higher figure is explained once. metrics.jsonl keeps the
        unclamped value."""
        if mfu > 1.0 and not self.mfu_warned:
            self.mfu_warned = True
            self.log(f"MFU {100 * mfu:.0f}% exceeds the measured matmul peak ({self.device_peak / 1e9:,.0f} GFLOP/s): "
                     "the peak was measured on a busy machine (a quiet start raises the cached best: "
                     f"{peak_cache_path()}), or the FLOPs count overstates this model (see monovlm/train/flops.py); "
                     "the progress bar shows at most 100%")
        return f"{100 * min(mfu, 1.0):.1f}%"

    # ---------------------------------------------------------------------------------------------------------------
    # eval and checkpoints

    def evaluate(self, model: EncoderFreeVLM, processor: Processor, stage: StageConfig, global_step: int,
                 result: TrainResult) -> None:
        """Short-answer accuracy per answer type with the image and with a blank one (see `eval.qa.blind_gaps`),
        logged and written to metrics.jsonl; a warning names every answer type within noise of blind."""
        options = self.options
        if not options.eval_data or stage.template == "plain" or stage.lm_weight == 0:
            return  # a caption-only stage cannot answer questions yet, nor one without the next-token loss
        if options.strategy == "fsdp" and self.info.enabled:
            self.log("eval skipped under FSDP (sharded weights); evaluate the saved model with `monovlm eval`")
            return
        if options.strategy == "ddp" and not self.info.is_main:
            barrier(self.info)
            return
        from monovlm.eval.qa import blind_gaps, evaluate_qa, yes_no_groups

        records, image_root, source = self.eval_records(stage)
        if records:
            scores = evaluate_qa(model, processor, records, image_root)
            blind = evaluate_qa(model, processor, records, image_root, blank=True)
            gaps = blind_gaps(scores, blind)
            record = {"stage": stage.name, "global_step": global_step, "flops": self.total_flops,
                      "eval": scores.accuracy, "blind": blind.accuracy, "eval_on": source}
            result.evals.append(record)
            self.write_metrics(record)
            # a stage trained without yes/no questions (yes_no = "open") is not expected to answer them yet
            untrained = yes_no_groups(records) if stage.yes_no == "open" else set()
            self.log(f"eval @ step {global_step} on {source}:\n"
                     + "\n".join("  " + gap.line(trained=gap.group not in untrained) for gap in gaps))
            flat = [gap.group for gap in gaps if not gap.looks and gap.group not in untrained]
            if flat:
                self.log(f"WARNING: stage {stage.name!r} at step {global_step}: {', '.join(flat)} answered no better "
                         "than with a blank image — the model answers them from the question's wording, not the "
                         "image (README: 'When the model does not look')")
        if options.strategy == "ddp":
            barrier(self.info)

    def eval_records(self, stage: StageConfig) -> tuple[list[dict[str, Any]], Path, str]:
        """(records, their image root, what they are) for an eval: the --eval-data file when it exists, else
        questions of the stage's own training data with short answers (a check of looking, not of generalising).
        Read once per stage: a data file can be large, and the stage evaluates on it twice or more."""
        if stage.name not in self.eval_sets:
            options = self.options
            path = options.data_root / options.eval_data
            if path.is_file():
                records = read_records(path)[0][: options.eval_limit]
                self.eval_sets[stage.name] = records, path.parent, f"{path.name} ({len(records)} questions)"
            elif (options.data_root / stage.data_files[0][0]).is_dir():  # a shard folder: its images are in tars
                folder = stage.data_files[0][0]
                self.log(f"no eval in stage {stage.name!r}: it reads the shard folder {folder}, whose images are not "
                         "files; give a QA file with --eval-data FILE")
                self.eval_sets[stage.name] = [], options.data_root, folder
            else:
                file = options.data_root / stage.data_files[0][0]
                image_root = options.data_root / stage.image_root if stage.image_root else file.parent
                records = short_answer_records(read_records(file)[0], options.eval_limit, self.recipe.seed)
                self.eval_sets[stage.name] = records, image_root, f"{len(records)} training questions of {file.name}"
        return self.eval_sets[stage.name]

    def save(self, module: TrainModule, tokenizer: Tokenizer, optimizer, stream: BatchStream, stage_index: int,
             next_step: int, global_step: int, stage_done: bool) -> None:
        stage_count = len(self.recipe.stages)
        full_state, optimizer_state = gather_state(module, optimizer, self.info, self.options.strategy,
                                                   with_optimizer=not stage_done)
        model_state = {k.removeprefix("model."): v for k, v in full_state.items() if k.startswith("model.")}
        aligner_state = {k.removeprefix("aligner."): v for k, v in full_state.items() if k.startswith("aligner.")}
        qa_head_state = {k.removeprefix("visual_qa_head."): v for k, v in full_state.items()
                         if k.startswith("visual_qa_head.")}
        # a finished stage resumes at the start of the next one (fresh optimizer), not at its own end
        train_state = {
            "stage": stage_index + 1 if stage_done else stage_index,
            "step": 0 if stage_done else next_step,
            "global_step": global_step,
            "optimizer": optimizer_state,
            "stream": stream.state() if not stage_done else {"epoch": 0, "batch": 0},
            "rng": ckpt.rng_state(),
            "aligner": aligner_state or None,
            "visual_qa_head": qa_head_state or None,
            "flops": self.total_flops,
        }
        if stage_done and stage_index + 1 >= stage_count:
            train_state["finished"] = True
        if self.info.is_main:
            folder = ckpt.checkpoint_dir(self.run_dir, global_step)
            ckpt.save_checkpoint(folder, module.model, tokenizer, train_state, keep=self.options.keep_checkpoints,
                                 state_dict=model_state)
        barrier(self.info)


def train(options: TrainOptions) -> TrainResult:
    """Run the recipe. Under torchrun the process group is ended at the end, also on errors (see
    `distributed.shutdown`: a gloo group left to interpreter shutdown can abort the process)."""
    trainer = Trainer(options)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.info)
