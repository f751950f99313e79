"""The training batch stream: a seeded order per epoch, sharded across ranks, resumable by position.

The order of epoch e is a permutation drawn from (seed, e); global batch b of that epoch is the slice
[b·B·W, (b+1)·B·W) of it, and rank r takes its r-th B samples (B = micro-batch size, W = world size). So the stream
is fully determined by (epoch, batch index): resuming only needs that position, and one process with micro-batch
B·W sees exactly the samples of W processes with micro-batch B. Bad samples are skipped and counted (see
datasets.py).

With `group_by_length` the permutation is replaced by length-grouped global batches (LLaVA's group_by_length: shuffle,
sort within mega-batches of 50 batches, shuffle the batch order), still a function of (seed, epoch) alone. Short
samples then share batches instead of being padded to the longest sample of a mixed batch: on the synthetic data a
batch of mazes (~100 tokens) costs about half a batch of multi-question scenes (~250).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.collate import Batch, collate, collate_packed, length_grouped_batches, pack
from monovlm.data.datasets import LlavaDataset, MixedDataset, SkipReport
from monovlm.data.processor import Processor
from monovlm.data.yes_no import without_yes_no, yes_no_singles
from monovlm.train.recipe import StageConfig


def stage_processor(stage: StageConfig, tokenizer, vision: VisionConfig) -> Processor:
    """The processor a stage trains with: its template, system prompt and max_length over the model's vision
    settings."""
    config = ProcessorConfig(template=stage.template, max_length=stage.max_length, system_prompt=stage.system_prompt)
    return Processor(tokenizer, vision, config)


def stage_dataset(stage: StageConfig, processor: Processor, data_root: Path,
                  seed: int = 0) -> LlavaDataset | MixedDataset:
    """A stage's data file (and image folder), relative to the data root; several files make a `MixedDataset`
    (each file grouped by image on its own, so a file read twice gives each conversation twice, not doubled). With
    `stage.yes_no` other than "grouped", each file is two parts: its records without the single yes/no questions,
    and those questions alone (see data/yes_no.py; `seed` draws the balancing repeats)."""
    image_root = Path(data_root) / stage.image_root if stage.image_root else None
    if stage.yes_no == "grouped":
        parts = [(LlavaDataset(Path(data_root) / file, processor, image_root, group_by_image=grouped), repeat)
                 for file, repeat, grouped in stage.data_files]
    else:  # each file's yes/no questions read alone (balanced per wording), its other records as before
        balanced = stage.yes_no == "balanced"
        singles = partial(yes_no_singles, balanced=balanced, seed=seed)
        parts = []
        for file, repeat, grouped in stage.data_files:
            parts.append((LlavaDataset(Path(data_root) / file, processor, image_root, group_by_image=grouped,
                                       select=without_yes_no, label="without yes/no" if grouped else None), repeat))
            parts.append((LlavaDataset(Path(data_root) / file, processor, image_root, select=singles,
                                       label="yes/no, balanced" if balanced else "yes/no"), 1))
    if len(parts) == 1 and parts[0][1] == 1:
        return parts[0][0]
    return MixedDataset(parts)


def stage_stream(stage: StageConfig, dataset: LlavaDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, announce_epochs: bool = True) -> "BatchStream":
    """A stage's batch stream (the trainer's and the FLOPs planner's, so both draw the same samples)."""
    return BatchStream(dataset, batch_size, seed, pad_id, rank, world_size, stage.pack, stage.max_length,
                       announce_epochs=announce_epochs, group_by_length=stage.group_by_length)


@dataclass
class StreamPosition:
    epoch: int = 0
    batch: int = 0


class BatchStream:
    def __init__(self, dataset: LlavaDataset | MixedDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, packed: bool = False, max_length: int = 512, announce_epochs: bool = True,
                 group_by_length: bool = False):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"{dataset.name} has {len(dataset)} samples, fewer than one global batch "
                             f"({batch_size} × {world_size} ranks)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.packed = packed
        self.max_length = max_length
        self.announce_epochs = announce_epochs  # print a line at each new epoch (rank 0)
        # per-sample length estimates (text characters: no image is decoded) when batches are grouped by length
        self.lengths = dataset.text_lengths() if group_by_length else None
        self.position = StreamPosition()
        self.report: SkipReport = dataset.new_report() if rank == 0 else SkipReport()
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)  # the ragged tail is dropped, as usual

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            epoch_seed = self.seed * 100_003 + epoch
            if self.lengths is None:
                self._order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(epoch_seed))
            else:
                global_batch = self.batch_size * self.world_size
                batches = length_grouped_batches(self.lengths, global_batch, epoch_seed)
                # the one ragged batch is dropped, as the unsorted stream drops its tail: same batches per epoch
                self._order = torch.tensor([i for batch in batches if len(batch) == global_batch for i in batch],
                                           dtype=torch.long)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        if self.position.batch >= self.batches_per_epoch:
            self.position = StreamPosition(self.position.epoch + 1, 0)
            if self.rank == 0 and self.announce_epochs:
                print(f"data: epoch {self.position.epoch} of {self.dataset.name}; {self.report.summary()}")
        order = self._epoch_order(self.position.epoch)
        start = (self.position.batch * self.world_size + self.rank) * self.batch_size
        self.position = StreamPosition(self.position.epoch, self.position.batch + 1)
        return order[start : start + self.batch_size].tolist()

    def next_batch(self) -> Batch | None:
        """The next micro-batch of this rank; None if every sample in it was unusable (the step still counts)."""
        samples = list(self.dataset.processed(self.report, self.next_indices()))
        if not samples:
            return None
        if self.packed:
            rows = pack([len(s) for s in samples], self.max_length)
            return collate_packed([[samples[i] for i in row] for row in rows], self.pad_id)
        return collate(samples, self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(int(state["epoch"]), int(state["batch"]))
