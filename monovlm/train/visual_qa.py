"""An auxiliary objective on the student's own visual tokens: a small head answers the data's short questions from them.

The next-token loss reaches the embedder only through every decoder layer, and EVE's align loss passes on only what
the teacher knows. On short-answer VQA data both leave the visual tokens saying what one patch shows (its colour)
and not what only several patches together show (which shape is there): a linear probe finds the colour in them and
not the kind, and the decoder cannot read what the tokens do not hold (docs/experiments.md). This objective asks the
tokens for the answers directly, through the `qa` teacher's head (`vit_qa.QAHead`: question words -> GRU -> FiLM
over the grid tokens -> max and mean over them -> one of the training answers), so the gradient reaches the tokens
where the asked object is:

    images -> model.embedder -> grid tokens (B, N, C) (CLS, separators, queries left out)
           [-> the decoder's first `depth` blocks, each image alone: the states at those tokens]
           -> QAHead with each question -> answer logits (Q, answers) -> cross-entropy, times `weight`

Each step (and micro-batch, and rank) draws `images` images that have short-answer questions from the stage's data
files, with all their questions; the draw depends only on (seed, global step, micro-batch, rank), so a resumed run
draws what the uninterrupted one did. Images are read at the model's resize policy and resized to one square (the
largest multiple of the pixels per token that fits max_pixels), so a batch is one tensor. The head trains with the
model and is kept in the training checkpoints; the saved model does not have it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from monovlm.config import VisionConfig
from monovlm.data.datasets import SkipReport
from monovlm.data.image_files import DataSource, iter_pixels
from monovlm.train.vit_qa import QAHead, QATask, QuestionVocabulary, qa_task, square_side, to_square

CACHE_BYTES = 512 * 2**20  # decoded images kept in memory; beyond it images are read from disk each time


@dataclass
class VisualQABatch:
    pixels: torch.Tensor  # (B, 3, S, S) normalised, as the model reads images
    ids: torch.Tensor  # (Q, L) question word ids, right-padded
    lengths: torch.Tensor  # (Q,)
    owner: torch.Tensor  # (Q,) the row of `pixels` each question is about
    targets: torch.Tensor  # (Q,) answer classes

    def to(self, device: torch.device | str) -> "VisualQABatch":
        return VisualQABatch(*(t.to(device) for t in (self.pixels, self.ids, self.lengths, self.owner, self.targets)))


class VisualQAData:
    """Draws each step's images and their questions (see the module docstring); unreadable images are skipped and
    counted in `skipped`."""

    def __init__(self, task: QATask, vision: VisionConfig, images_per_batch: int, seed: int):
        if images_per_batch <= 0:
            raise ValueError(f"images_per_batch={images_per_batch} must be positive")
        self.task = task
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.vision = vision
        self.side = square_side(vision, vision.pixels_per_token)
        self.image_ids = sorted(task.by_image)
        self.vocabulary = QuestionVocabulary([pair.question for pairs in task.by_image.values() for pair in pairs])
        self.skipped = SkipReport()
        self.cache: dict[int, torch.Tensor | None] = {}  # image index -> its pixels, None when unreadable
        self.cached_bytes = 0

    def pixels(self, index: int) -> torch.Tensor | None:
        """(3, S, S) model input (normalised as the model reads it), or None for an unreadable image (counted
        once)."""
        if index in self.cache:
            return self.cache[index]
        loaded = list(iter_pixels([self.task.images[index]], self.vision, self.skipped))
        pixels = to_square(loaded[0][1], self.side) if loaded else None
        size = 0 if pixels is None else pixels.numel() * pixels.element_size()
        if self.cached_bytes + size <= CACHE_BYTES:
            self.cache[index] = pixels
            self.cached_bytes += size
        return pixels

    def batch(self, global_step: int, micro_batch: int = 0, rank: int = 0) -> VisualQABatch | None:
        """The images and questions of one micro-batch; None when none of the drawn images could be read."""
        draw = random.Random(f"visual_qa/{self.seed}/{global_step}/{micro_batch}/{rank}")
        chosen = draw.sample(self.image_ids, min(self.images_per_batch, len(self.image_ids)))
        pixels, questions, owner = [], [], []
        for index in chosen:
            image = self.pixels(index)
            if image is None:
                continue
            questions += self.task.by_image[index]
            owner += [len(pixels)] * len(self.task.by_image[index])
            pixels.append(image)
        if not pixels:
            return None
        ids, lengths = self.vocabulary.encode([pair.question for pair in questions])
        return VisualQABatch(torch.stack(pixels), ids, lengths, torch.tensor(owner), self.task.targets(questions))


def visual_qa_data(data_root: str | os.PathLike, sources: Sequence[DataSource | str], vision: VisionConfig,
                   images_per_batch: int, seed: int) -> VisualQAData:
    """The objective's data from the stage's data files; a clear error when they hold no short-answer question."""
    listing = SkipReport()
    task = qa_task(data_root, sources, listing, objective="the visual_qa objective",
                   fallback="set visual_qa = false in the stages that read them")
    return VisualQAData(task, vision, images_per_batch, seed)


def visual_qa_head(hidden_size: int, data: VisualQAData, seed: int) -> QAHead:
    """A fresh head for the model's token width, initialised from `seed` without moving the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return QAHead(hidden_size, len(data.vocabulary), len(data.task.answers))


def grid_tokens(embedder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, S, S) -> the embedder's grid tokens (B, rows·cols, C), in the order the decoder reads them."""
    images = list(pixels)
    tokens = torch.stack(embedder(images))  # (B, N, C): same-size images give the same layout
    return tokens[:, embedder.token_layout(images[0]).patch_index]


def grid_states(model: nn.Module, pixels: torch.Tensor, depth: int) -> torch.Tensor:
    """pixels (B, 3, S, S) -> the grid tokens' states at decoder `depth` (B, rows·cols, C): depth 0 is the embedder's
    output, depth d the output of decoder block d (`align.HiddenCapture`'s numbering), each image read alone (its
    placeholders only, no text)."""
    if depth == 0:
        return grid_tokens(model.embedder, pixels)
    images = list(pixels)
    layout = model.embedder.token_layout(images[0])
    ids = torch.full((len(images), layout.num_tokens), model.image_token_id, device=pixels.device)  # (B, N)
    states = model.hidden_states(ids, images, torch.ones_like(ids), num_blocks=depth)  # blocks after `depth` skipped
    return states[:, layout.patch_index]


def visual_qa_loss(model: nn.Module, head: QAHead, batch: VisualQABatch, depth: int = 0) -> torch.Tensor:
    """Mean cross-entropy of the batch's answers, read by `head` from the grid tokens' states at `depth`
    (`grid_states`) of `model` (an `EncoderFreeVLM`)."""
    grid = grid_states(model, batch.pixels, depth)  # (B, N, C)
    logits = head(grid[batch.owner].float(), batch.ids, batch.lengths)  # (Q, answers)
    return F.cross_entropy(logits.float(), batch.targets)
