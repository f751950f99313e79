"""Equal-compute runs for benchmarks/ablation_align.py: predict, before training, the FLOPs the trainer will count for
each stage of a recipe, and set the length of the last stage so that a run spends a given budget. The trainer itself
knows no budget: a run is planned here and then trained as an ordinary recipe.

The trainer counts `training_flops(tokens, visual tokens, ...)` per optimizer step (see monovlm/train/flops.py). Both
counts depend only on which samples the step draws, and the batch stream's order is fixed by (recipe seed, stage,
epoch) — so the prediction replays the stream's indices over each sample's token counts. It is exact, not an estimate
from a mean: it equals the sum of the `flops` the trainer logs (tested), on any number of processes with the same
global batch.

That count follows a convention (6·N per trained weight, less for frozen ones, see flops.py) that is blind to some
real differences between architectures: an encoder that runs per image patch, a teacher that sees every image patch.
So a planner can also measure (`measured_ratios`): run the first steps of each stage through torch's FLOP counter and
give, per stage, measured / counted FLOPs. `fit(budget, ratios)` then equalises measured FLOPs (each stage's count
scaled by its ratio) instead of the trainer's count.

The last stage is the one stretched (or shortened): the earlier stages (alignment, pre-training) keep their recipe
lengths, and the last stage's warmup + cosine schedule spans its new length, so a longer run is an annealed run of
that length, not a cut one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monovlm.config import EncoderConfig
from monovlm.data.datasets import LlavaDataset
from monovlm.data.processor import ProcessedSample
from monovlm.train.build import build_model
from monovlm.train.data import stage_dataset, stage_processor, stage_stream
from monovlm.train.flops import flops_per_token, measure_flops, teacher_params, training_flops
from monovlm.train.parts import set_trainable
from monovlm.train.recipe import Recipe, StageConfig


@dataclass
class SampleCounts:
    """Per record of a stage's data: the tokens it trains on and how many of them are image tokens (0 and 0 for a
    record the trainer would skip)."""

    tokens: list[int]
    visual: list[int]
    skipped: int = 0


@dataclass
class StageFlops:
    name: str
    steps: int
    flops_per_token: float
    teacher_params: int
    step_flops: list[float] = field(repr=False)  # per optimizer step, as the trainer logs them

    @property
    def total(self) -> float:
        return sum(self.step_flops)


@dataclass
class FlopsPlan:
    recipe: Recipe  # the recipe as planned (its last stage's steps set by `FlopsPlanner.fit`)
    stages: list[StageFlops]
    ratios: list[float] | None = None  # per stage, measured / counted FLOPs, when measured

    @property
    def measured_total(self) -> float | None:
        """The run's FLOPs as measured (each stage's count times its ratio), when the ratios are known."""
        if self.ratios is None:
            return None
        return sum(ratio * stage.total for ratio, stage in zip(self.ratios, self.stages))

    @property
    def total(self) -> float:
        """The run's training FLOPs, summed step by step in order as the trainer sums them."""
        total = 0.0
        for stage in self.stages:
            for flops in stage.step_flops:
                total += flops
        return total

    def summary(self) -> str:
        text = (f"{self.recipe.name}: {self.total / 1e12:.4g} TFLOPs = "
                + " + ".join(f"{s.name} {s.steps} steps {s.total / 1e12:.4g}" for s in self.stages))
        if self.ratios is not None:
            text += (f"; measured ≈ {self.measured_total / 1e12:.4g} TFLOPs (measured/counted per stage "
                     + ", ".join(f"{r:.3f}" for r in self.ratios) + ")")
        return text


def sample_counts(dataset: LlavaDataset, image_token_id: int) -> SampleCounts:
    """Process every record once (as training would) and count its tokens; skipped records count 0."""
    tokens, visual, skipped = [], [], 0
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, ProcessedSample):
            tokens.append(len(item))
            visual.append(sum(1 for token in item.input_ids if token == image_token_id))
        else:
            tokens.append(0)
            visual.append(0)
            skipped += 1
    return SampleCounts(tokens, visual, skipped)


def stage_step_flops(stage: StageConfig, stage_index: int, seed: int, dataset: LlavaDataset, counts: SampleCounts,
                     flops_token: float, teacher_param_count: int, world_size: int = 1) -> Iterator[float]:
    """The FLOPs of the stage's optimizer steps in order, endlessly (the stream wraps into new epochs).

    One process with micro-batch B·W draws exactly the samples of W ranks with micro-batch B (see data.py)."""
    if not any(counts.tokens):
        raise ValueError(f"stage {stage.name!r}: {dataset.name} has no usable sample ({counts.skipped} skipped)")
    stream = stage_stream(stage, dataset, stage.batch_size * world_size, seed + stage_index, 0, announce_epochs=False)
    while True:
        tokens = visual = 0
        for _ in range(stage.grad_accum):
            for index in stream.next_indices():
                tokens += counts.tokens[index]
                visual += counts.visual[index]
        yield training_flops(float(tokens), float(visual), flops_token, teacher_param_count)


class FlopsPlanner:
    """Builds the recipe's model once (untrained: only its size matters; a baseline's encoder is not pretrained)
    and its tokenizer (trained exactly as the trainer trains it), then plans stages."""

    def __init__(self, recipe: Recipe, data_root: str | Path, world_size: int = 1):
        self.recipe = recipe
        self.data_root = Path(data_root)
        self.world_size = world_size
        sized = copy.deepcopy(recipe)
        sized.model.encoder_init = "random"  # the same parameters; pretraining them changes no count
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)  # as the trainer does before building: the same tokenizer and model
            self.model, self.tokenizer = build_model(sized, self.data_root)
            self.teacher = self._teacher()
        self.teacher_param_count = teacher_params(self.teacher) if self.teacher is not None else 0
        self._counts: dict[tuple, tuple[LlavaDataset, SampleCounts]] = {}
        self._module = None

    def _teacher(self):
        """The align teacher the trainer would use, untrained (only its size and shapes matter here)."""
        align = self.recipe.align
        if align is None or not any(stage.align for stage in self.recipe.stages):
            return None
        if align.teacher == "vit":  # what the trainer pretrains (same architecture), without the pretraining
            from monovlm.model.teachers import ViTTeacher
            from monovlm.model.vit import ViT

            config = EncoderConfig(width=align.teacher_width, depth=align.teacher_depth, heads=align.teacher_heads)
            return ViTTeacher(ViT(config, self.model.config.vision.patch_size))
        from monovlm.data.image_files import stage_sources
        from monovlm.model.teachers import build_teacher

        return build_teacher(align, self.model.config.vision, self.data_root, run_dir=None,
                             sources=stage_sources(self.recipe.stages))

    def _dataset_counts(self, stage: StageConfig) -> tuple[LlavaDataset, SampleCounts]:
        key = (tuple(stage.data_files), stage.image_root, stage.template, stage.max_length, stage.yes_no,
               tuple(stage.token_pools or ()))
        if key not in self._counts:
            processor = stage_processor(stage, self.tokenizer, self.model.config.vision, seed=self.recipe.seed)
            dataset = stage_dataset(stage, processor,
                                    self.data_root, seed=self.recipe.seed)
            self._counts[key] = dataset, sample_counts(dataset, self.model.image_token_id)
        return self._counts[key]

    def steps(self, stage_index: int) -> tuple[float, int, Iterator[float]]:
        """(FLOPs per token, teacher parameters, per-step FLOPs iterator) of a stage."""
        stage = self.recipe.stages[stage_index]
        dataset, counts = self._dataset_counts(stage)
        set_trainable(self.model, stage.train)  # as the trainer does: frozen parts cost less per token
        flops_token = flops_per_token(self.model, stage.max_length // 2)
        teacher = self.teacher_param_count if stage.align else 0
        return flops_token, teacher, stage_step_flops(stage, stage_index, self.recipe.seed, dataset, counts,
                                                      flops_token, teacher, self.world_size)

    def stage(self, stage_index: int, steps: int | None = None) -> StageFlops:
        stage = self.recipe.stages[stage_index]
        steps = stage.steps if steps is None else steps
        flops_token, teacher, iterator = self.steps(stage_index)
        return StageFlops(stage.name, steps, flops_token, teacher, [next(iterator) for _ in range(steps)])

    def plan(self) -> FlopsPlan:
        """The recipe as written."""
        return FlopsPlan(self.recipe, [self.stage(i) for i in range(len(self.recipe.stages))])

    def fit(self, budget: float, ratios: list[float] | None = None) -> FlopsPlan:
        """A copy of the recipe whose last stage has the step count that brings the run's total nearest to `budget`
        (at least one step); the earlier stages are kept as written. With `ratios` (see `measured_ratios`) the
        total is the measured one (each stage's count times its ratio), else the trainer's count."""
        count = len(self.recipe.stages)
        if ratios is not None and len(ratios) != count:
            raise ValueError(f"{len(ratios)} ratios for the {count} stages of recipe {self.recipe.name!r}")
        earlier = [self.stage(i) for i in range(count - 1)]
        if ratios is None:
            # summed in the trainer's order: an unchanged recipe fits exactly
            spent = FlopsPlan(self.recipe, earlier).total
            scale = 1.0
        else:
            spent = sum(ratio * stage.total for ratio, stage in zip(ratios, earlier))
            scale = ratios[-1]
        last = self.recipe.stages[-1]
        if spent >= budget:
            raise ValueError(f"recipe {self.recipe.name!r}: its stages before {last.name!r} already spend "
                             f"{spent / 1e12:.4g} TFLOPs, not under the budget of {budget / 1e12:.4g} TFLOPs; "
                             f"only the last stage's length is adjusted")
        flops_token, teacher, iterator = self.steps(count - 1)
        step_flops: list[float] = []
        total = spent
        while total < budget:
            step_flops.append(next(iterator))
            total += scale * step_flops[-1]
        if len(step_flops) > 1 and total - budget > budget - (total - scale * step_flops[-1]):
            step_flops.pop()  # one step fewer lands nearer to the budget
        recipe = copy.deepcopy(self.recipe)
        recipe.stages[-1].steps = len(step_flops)
        stages = [*earlier, StageFlops(last.name, len(step_flops), flops_token, teacher, step_flops)]
        return FlopsPlan(recipe, stages, list(ratios) if ratios is not None else None)

    def _train_module(self):
        """What the trainer's optimizer sees (the VLM, plus the align head when the recipe has one), untrained."""
        if self._module is None:
            from monovlm.train.trainer import TrainModule

            aligner = layers = None
            if self.teacher is not None:
                from monovlm.model.align import PatchAligner, eve_layers

                align = self.recipe.align
                num_layers = self.model.config.decoder.num_layers
                layers = align.layers if align.layers is not None else eve_layers(num_layers)
                with torch.random.fork_rng(devices=[]):
                    aligner = PatchAligner(self.model.config.decoder.hidden_size, self.teacher.feature_dim,
                                           len(layers), heads=align.heads, loss=align.loss, weight=align.weight)
            self._module = TrainModule(self.model, aligner), layers
        return self._module

    def measured_ratio(self, stage_index: int, steps: int = 2) -> float:
        """Measured / counted FLOPs over the stage's first `steps` optimizer steps (forward + backward in float32
        with the stage's trainable parts; one process holding the whole global batch, so padding may differ a
        little from W ranks padding their own micro-batches)."""
        if steps <= 0:
            raise ValueError(f"steps={steps} must be positive")
        stage = self.recipe.stages[stage_index]
        dataset, _ = self._dataset_counts(stage)
        module, layers = self._train_module()
        set_trainable(module, stage.train)
        teacher = self.teacher if stage.align else None
        stream = stage_stream(stage, dataset, stage.batch_size * self.world_size, self.recipe.seed + stage_index,
                              self.tokenizer.pad_id or 0, announce_epochs=False)
        _, _, counted_steps = self.steps(stage_index)
        measured = counted = 0.0
        for _ in range(steps):
            counted += next(counted_steps)
            for _ in range(stage.grad_accum):
                batch = stream.next_batch()
                if batch is None:
                    continue

                def forward_backward(batch=batch) -> None:
                    ce_sum, align = module(batch, teacher, layers)
                    (ce_sum + align).backward()

                measured += measure_flops(forward_backward)
                module.zero_grad(set_to_none=True)
        return measured / counted

    def measured_ratios(self, steps: int = 2) -> list[float]:
        return [self.measured_ratio(i, steps) for i in range(len(self.recipe.stages))]


def plan_flops(recipe: Recipe, data_root: str | Path, world_size: int = 1) -> FlopsPlan:
    """The training FLOPs the trainer will count for `recipe` as written, per stage and step."""
    return FlopsPlanner(recipe, data_root, world_size).plan()

