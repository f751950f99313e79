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

With `num_workers` > 0 the micro-batches are read, decoded, resized, tokenized and collated in DataLoader worker
processes, `prefetch` batches ahead per worker, while the model trains. The batches stay exactly those of the
in-process path: the main process still decides which indices each batch reads (the same pure function of the
position), counts the workers' skips into the one `SkipReport` in reading order, and moves the position only when a
batch is consumed, so `state()` never counts a batch that was prefetched but not trained on.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.collate import Batch, collate, collate_packed, length_grouped_batches, pack
from monovlm.data.datasets import LlavaDataset, MixedDataset, SkippedSample, SkipReport
from monovlm.data.processor import ProcessedSample, Processor
from monovlm.data.shards import ShardDataset
from monovlm.data.yes_no import WordingBalance, without_yes_no, without_yes_no_turns, yes_no_singles, yes_no_word
from monovlm.train.recipe import StageConfig


def stage_processor(stage: StageConfig, tokenizer, vision: VisionConfig, seed: int = 0) -> Processor:
    """The processor a stage trains with: its template, system prompt and max_length over the model's vision
    settings, and its TokenFLEX pooling factors (drawn per image with `seed`)."""
    config = ProcessorConfig(template=stage.template, max_length=stage.max_length, system_prompt=stage.system_prompt)
    return Processor(tokenizer, vision, config, token_pools=stage.token_pools, pool_seed=seed)


def stage_dataset(stage: StageConfig, processor: Processor, data_root: Path, seed: int = 0,
                  teacher_questions: Path | None = None,
                  even_teacher_answers: bool = False) -> LlavaDataset | ShardDataset | MixedDataset:
    """A stage's data file (and image folder), relative to the data root; several files make a `MixedDataset`
    (each file grouped by image on its own, so a file read twice gives each conversation twice, not doubled). With
    `stage.yes_no` "singles" or "balanced", each file is two parts: its records without the single yes/no
    questions, and those questions alone (see data/yes_no.py; `seed` draws the balancing repeats); with "weighted",
    the files are read as they are and the yes/no replies' losses weighted per wording over all of them; with "open",
    without their yes/no questions (also those inside conversations). `stage.isolate_turns` applies to the files
    grouped by image. With `stage.teacher_questions`, each file's records come with the teacher's questions about
    its images (`teacher_questions`: RUN/teacher/questions.json; `stage.teacher_questions` "yes/no" or "open": only
    those), before any of the above; with "open", its open questions, and its yes/no ones only with
    `even_teacher_answers` ([align] teacher_yes_share = "even": the wording predicts none of them), after the data's
    yes/no are out.
    A data "file" that is a shard folder (`monovlm data shard`) is read the same way, its images from its tars."""
    image_root = Path(data_root) / stage.image_root if stage.image_root else None
    asked = read_teacher_questions(teacher_questions) if stage.teacher_questions else None
    if stage.teacher_questions in ("yes/no", "open"):  # only that kind of the teacher's questions
        wanted_yes_no = stage.teacher_questions == "yes/no"
        asked = [record for record in asked
                 if (yes_no_word(record["conversations"][1]["value"]) is not None) == wanted_yes_no]

    def open_data(file: str, **options) -> LlavaDataset | ShardDataset:
        options["isolate_turns"] = stage.isolate_turns and options.get("group_by_image", False)
        if asked is not None:  # in "open" the teacher's join after the data's yes/no are out
            options["select"] = with_teacher_questions(asked, options.get("select"),
                                                       select_first=stage.yes_no == "open",
                                                       keep_theirs=even_teacher_answers)
        path = Path(data_root) / file
        if path.is_dir():  # a shard folder holds its images: no image root
            return ShardDataset(path, processor, **options)
        return LlavaDataset(path, processor, image_root, **options)

    if stage.yes_no in ("grouped", "weighted"):
        parts = [(open_data(file, group_by_image=grouped), repeat) for file, repeat, grouped in stage.data_files]
        if stage.yes_no == "weighted":
            balance = WordingBalance([record for dataset, _ in parts for record in dataset.records
                                      if isinstance(record, dict)])  # a bad line read on demand is a skip
            for dataset, _ in parts:
                dataset.reply_weights = balance
    elif stage.yes_no == "open":
        parts = [(open_data(file, group_by_image=grouped, select=without_yes_no_turns, label="open questions"), repeat)
                 for file, repeat, grouped in stage.data_files]
    else:  # each file's yes/no questions read alone (balanced per wording), its other records as before
        balanced = stage.yes_no == "balanced"
        singles = partial(yes_no_singles, balanced=balanced, seed=seed)
        parts = []
        for file, repeat, grouped in stage.data_files:
            parts.append((open_data(file, group_by_image=grouped, select=without_yes_no,
                                  label="without yes/no" if grouped else None), repeat))
            parts.append((open_data(file, select=singles, label="yes/no, balanced" if balanced else "yes/no"), 1))
    if len(parts) == 1 and parts[0][1] == 1:
        return parts[0][0]
    return MixedDataset(parts)


def read_teacher_questions(path: Path | None) -> list[dict]:
    """The teacher's questions file ([align] teacher_questions), a clear error when it is not there."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"the stage reads the teacher's questions (teacher_questions = true) but {path} does "
                                "not exist: it is written when the \"qa\" teacher is pretrained with [align] "
                                "teacher_questions > 0")
    return json.loads(Path(path).read_text())


def with_teacher_questions(asked: list[dict], select=None, select_first: bool = False, keep_theirs: bool = False):
    """A `select` for a data file's records: them and the teacher's questions about their images, then `select`
    (with `select_first`, `select` of the records, then the teacher's questions: all of them with `keep_theirs`,
    else those `select` keeps)."""
    def chosen(records: list[dict]) -> list[dict]:
        images = {record.get("image") for record in records if isinstance(record, dict)}
        theirs = [question for question in asked if question["image"] in images]
        if select is None:
            return list(records) + theirs
        if select_first:
            return select(records) + (theirs if keep_theirs else select(theirs))
        return select(list(records) + theirs)
    return chosen


def stage_stream(stage: StageConfig, dataset: LlavaDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, announce_epochs: bool = True, num_workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False) -> "BatchStream":
    """A stage's batch stream (the trainer's and the FLOPs planner's, so both draw the same samples)."""
    return BatchStream(dataset, batch_size, seed, pad_id, rank, world_size, stage.pack, stage.max_length,
                       announce_epochs=announce_epochs, group_by_length=stage.group_by_length,
                       num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory)


MAX_AUTO_WORKERS = 4  # reading and resizing a micro-batch rarely needs more to keep ahead of one accelerator


def auto_workers(cores: int | None = None, ranks_per_machine: int | None = None) -> int:
    """`[data] num_workers = "auto"`: min(4, c - 1) worker processes per rank, c being the cores this process may use
    divided among the ranks of its machine (torchrun's LOCAL_WORLD_SIZE); 0 (read in the training process) when
    c <= 2, where the model's forward and backward already keep both cores busy and a worker would only take time
    from them."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if ranks_per_machine is None:
        ranks_per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_rank = cores // max(1, ranks_per_machine)
    return 0 if per_rank <= 2 else min(MAX_AUTO_WORKERS, per_rank - 1)


def resolve_workers(num_workers: int | str) -> int:
    """The worker count a `[data] num_workers` value asks for ("auto" or an int >= 0)."""
    return auto_workers() if num_workers == "auto" else int(num_workers)


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    batch: int = 0


def collate_samples(samples: list[ProcessedSample], pad_id: int, packed: bool, max_length: int) -> Batch | None:
    """One micro-batch of usable samples (None if there are none): one per row, or packed into rows of max_length."""
    if not samples:
        return None
    if packed:
        rows = pack([len(s) for s in samples], max_length)
        return collate_packed([[samples[i] for i in row] for row in rows], pad_id)
    return collate(samples, pad_id)


@dataclass
class LoadedBatch:
    """What a worker hands back for one read: the batch, and per index read its skip (None: usable), for the main
    process to count in reading order."""

    position: StreamPosition
    batch: Batch | None
    reads: list[SkippedSample | None]

    def pin_memory(self) -> "LoadedBatch":  # called by the DataLoader's pinning thread when pin_memory is on
        if self.batch is None:
            return self
        batch = self.batch
        pinned = dataclasses.replace(batch, input_ids=batch.input_ids.pin_memory(), labels=batch.labels.pin_memory(),
                                     attention_mask=batch.attention_mask.pin_memory(),
                                     images=[image.pin_memory() for image in batch.images],
                                     label_weights=None if batch.label_weights is None
                                     else batch.label_weights.pin_memory(),
                                     turn_ids=None if batch.turn_ids is None else batch.turn_ids.pin_memory())
        return LoadedBatch(self.position, pinned, self.reads)


class BatchReader(Dataset):
    """Map-style dataset for the workers: item (position, indices) is that micro-batch, read and collated."""

    def __init__(self, dataset: LlavaDataset | MixedDataset, pad_id: int, packed: bool, max_length: int):
        self.dataset = dataset
        self.pad_id = pad_id
        self.packed = packed
        self.max_length = max_length

    def __getitem__(self, read: tuple[StreamPosition, list[int]]) -> LoadedBatch:
        position, indices = read
        items = [self.dataset[index] for index in indices]
        samples = [item for item in items if not isinstance(item, SkippedSample)]
        reads = [item if isinstance(item, SkippedSample) else None for item in items]
        return LoadedBatch(position, collate_samples(samples, self.pad_id, self.packed, self.max_length), reads)


def _loaded(item: LoadedBatch) -> LoadedBatch:  # the DataLoader's collate_fn: a worker's item is already a batch
    return item


def _start_method() -> str | None:
    """fork where the platform has it (Linux): workers start in milliseconds and share the parsed records without
    pickling them. They never touch the accelerator (batches are pinned in the main process), so forking after
    CUDA is initialised is safe. Elsewhere the platform's default (spawn)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class BatchStream:
    def __init__(self, dataset: LlavaDataset | MixedDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, packed: bool = False, max_length: int = 512, announce_epochs: bool = True,
                 group_by_length: bool = False, num_workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
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
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"num_workers must be >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
        self.num_workers = num_workers  # 0: read in this process, on demand
        self.prefetch = prefetch  # batches read ahead per worker
        self.pin_memory = pin_memory  # page-locked batches, for faster copies to a CUDA device
        self._loaded: Iterator[LoadedBatch] | None = None  # the workers' batches, from the position onward

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

    def _rolled(self, position: StreamPosition) -> StreamPosition:
        """The position of the batch read at `position`: past the epoch's last batch, the next epoch's first."""
        return StreamPosition(position.epoch + 1, 0) if position.batch >= self.batches_per_epoch else position

    def _indices_at(self, position: StreamPosition) -> list[int]:
        order = self._epoch_order(position.epoch)
        start = (position.batch * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def _advance(self) -> StreamPosition:
        """Move the position one batch on; the position of the batch consumed (a new epoch is announced)."""
        read = self._rolled(self.position)
        if read.epoch != self.position.epoch and self.rank == 0 and self.announce_epochs:
            print(f"data: epoch {read.epoch} of {self.dataset.name}; {self.report.summary()}")
        self.position = StreamPosition(read.epoch, read.batch + 1)
        return read

    def next_indices(self) -> list[int]:
        return self._indices_at(self._advance())

    def next_batch(self) -> Batch | None:
        """The next micro-batch of this rank; None if every sample in it was unusable (the step still counts)."""
        if self.num_workers == 0:
            samples = list(self.dataset.processed(self.report, self.next_indices()))
            return collate_samples(samples, self.pad_id, self.packed, self.max_length)
        read = self._advance()
        if self._loaded is None:
            self._loaded = iter(self._loader(read))
        loaded = next(self._loaded)
        if loaded.position != read:  # the sampler and this count must walk the same positions
            raise RuntimeError(f"the data workers returned the batch at {loaded.position}, expected {read}")
        for item in loaded.reads:
            self.report.record(item)
        return loaded.batch

    def _reads_from(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, list[int]]]:
        """(position, indices) of every batch from `start` on, without end: what the workers are asked to read."""
        position = start
        while True:
            position = self._rolled(position)
            yield position, self._indices_at(position)
            position = StreamPosition(position.epoch, position.batch + 1)

    def _loader(self, start: StreamPosition) -> DataLoader:
        # a private generator: the DataLoader draws its workers' base seed from it, which from the global RNG would
        # shift the training's random stream by where the loader (re)started, and a resumed run would differ
        generator = torch.Generator().manual_seed(self.seed)
        # batch_size=None: the sampler's items, (position, indices), go to BatchReader as they are
        return DataLoader(BatchReader(self.dataset, self.pad_id, self.packed, self.max_length),
                          batch_size=None, sampler=self._reads_from(start), collate_fn=_loaded,
                          num_workers=self.num_workers, prefetch_factor=self.prefetch, pin_memory=self.pin_memory,
                          persistent_workers=False, multiprocessing_context=_start_method(), generator=generator)

    def close(self) -> None:
        """Stop the worker processes (a later `next_batch` starts new ones at the position)."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None and hasattr(loaded, "_shutdown_workers"):
            loaded._shutdown_workers()

    def state(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.close()  # batches prefetched from the old position are not the ones to read next
        self.position = StreamPosition(int(state["epoch"]), int(state["batch"]))

