"""Batching processed samples: padded batches, packed rows, and length-grouped batch order.

Both layouts give the decoder a segment-id attention mask (see `model/masks.py`): 0 marks padding, and in a packed
row each sample has its own id, so attention stays inside a sample and positions restart at 0 for each. Packed and
unpacked batches therefore give the same logits for every sample (tested).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from monovlm.data.processor import IGNORE_INDEX, ProcessedSample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where no loss
    attention_mask: torch.Tensor  # (B, T) segment ids: 0 = padding, k = k-th sample of the row
    images: list[torch.Tensor]  # every image of the batch in row-major order of their placeholders
    num_samples: int
    image_keys: list[str] = field(default_factory=list)  # the images' data paths, same order (when known)
    label_weights: torch.Tensor | None = None  # (B, T) float loss weight per token; None when every weight is 1
    turn_ids: torch.Tensor | None = None  # (B, T) isolated turns: 0 shared, k turn k of its sample; None: no sample has

    @property
    def num_tokens(self) -> int:
        return int((self.attention_mask != 0).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device),
                     [image.to(device) for image in self.images], self.num_samples, self.image_keys,
                     None if self.label_weights is None else self.label_weights.to(device),
                     None if self.turn_ids is None else self.turn_ids.to(device))


def collate(samples: Sequence[ProcessedSample], pad_id: int, pad_to: int | None = None) -> Batch:
    """One sample per row, right-padded to the longest (or to pad_to)."""
    return collate_packed([[sample] for sample in samples], pad_id, pad_to)


def collate_packed(rows: Sequence[Sequence[ProcessedSample]], pad_id: int, pad_to: int | None = None) -> Batch:
    """Several samples per row, concatenated, each with its own segment id; rows right-padded."""
    lengths = [sum(len(s) for s in row) for row in rows]
    width = max(lengths) if pad_to is None else pad_to
    if max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit pad_to={width}")
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    weighted = any(sample.label_weights is not None for row in rows for sample in row)
    weights = torch.ones((len(rows), width)) if weighted else None
    isolated = any(sample.turn_ids is not None for row in rows for sample in row)
    turn_ids = torch.zeros((len(rows), width), dtype=torch.long) if isolated else None
    images: list[torch.Tensor] = []
    keys: list[str] = []
    for row_index, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row, start=1):
            end = start + len(sample)
            input_ids[row_index, start:end] = torch.tensor(sample.input_ids)
            labels[row_index, start:end] = torch.tensor(sample.labels)
            segments[row_index, start:end] = segment
            if weights is not None and sample.label_weights is not None:
                weights[row_index, start:end] = torch.tensor(sample.label_weights)
            if turn_ids is not None and sample.turn_ids is not None:
                turn_ids[row_index, start:end] = torch.tensor(sample.turn_ids)
            images += sample.images
            keys += sample.image_keys
            start = end
    return Batch(input_ids, labels, segments, images, sum(len(row) for row in rows),
                 keys if len(keys) == len(images) else [], weights, turn_ids)


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows of at most max_length tokens (first-fit over decreasing length).

    Every index appears exactly once; a sample longer than max_length gets a row of its own (the processor already
    refuses samples over its max_length, so this only happens if the two limits differ)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return rows


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega_batch: int = 50) -> list[list[int]]:
    """Shuffled batches whose samples have similar lengths (less padding): shuffle, cut into mega-batches of
    `mega_batch` batches, sort each by length, split into batches, shuffle the batch order."""
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    span = batch_size * mega_batch
    batches = []
    for start in range(0, len(indices), span):
        chunk = sorted(indices[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
