"""Pre-training monovlm's ViT offline — EVE's teacher and the LLaVA-style baseline's encoder — with one of three
objectives ("qa", learning from the data's short answers, is in `monovlm.train.vit_qa`).

**"mae", for any data** (the default): masked patch prediction as in MAE (He et al., 2022). Each step hides 75% of
an image's patches; the ViT encodes the visible quarter (`ViT.embed` then `ViT.encode` on the kept tokens), and a
small decoder (`MAEDecoder`) puts mask tokens in the hidden places and predicts their pixels; the loss is the MSE on
the hidden patches only. It needs nothing but the user's images (no labels, no captions, no text tower), read from
the recipe's LLaVA data files through the safe loader (`monovlm.data.image_files`). Why this objective and not
CLIP-style contrastive on image/caption pairs: EVE's align loss is per patch, and MAE's target is per patch too,
dense, and forces each patch's feature to carry its own content and — to fill its hidden neighbours — the shape and
layout around it; a contrastive loss supervises one pooled vector per image, needs a text tower and large batches of
negatives, and a few thousand captions are too few for it. Encoding only the visible quarter also makes a step ~4×
cheaper than a full forward. The pixels are the model's normalised ones, not MAE's per-patch normalised ones: on
flat-colour images a per-patch normalisation would erase the colour, which is most of what a patch holds.

**"labels", synthetic data only**: every patch gets two coverage distributions — which colour and which kind of thing
(a shape kind, text, a maze wall or background) covers how much of it — and the ViT learns to predict them with
linear heads, so its patch features must carry colour, shape and (through the dense layout) position. Soft targets
(coverage fractions, not a thresholded label) mean a small shape that covers a quarter of a patch is still visible
there. Two more terms: each shape's colour and kind at its centre patch (see `_losses`), and the written word from the
mean patch feature. The per-pixel labels come from the scenes' ground truth (`monovlm.data.synthetic.pixel_labels`),
which only `monovlm data synth` writes.

- `pretrain_vit`: either objective (the heads / the decoder are discarded after).
- `pretrain_vit_mae`, `MAEDecoder`, `masked_patch_loss`: the "mae" objective.
- `pretrain_vit_labels`, `load_patch_dataset`, `evaluate_patches`: the "labels" objective and its accuracies.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.datasets import SkipReport
from monovlm.data.image_files import DataImage, DataSource, data_images, iter_pixels
from monovlm.data.images import group_by_size, image_to_tensor, load_image, patchify, shift_image
from monovlm.data.synthetic import COLOUR_CLASSES, KIND_CLASSES, WORD_CLASSES, pixel_labels
from monovlm.model.vit import Block, ViT, sincos_position_embedding
from monovlm.train.vit_qa import pretrain_vit_qa

OBJECTIVES = ("mae", "labels", "qa")


def _label_maps(colour_ids: np.ndarray, kind_ids: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(2, height, width) uint8 class ids (colour, kind) at the model's input size; nearest resampling when the
    resize policy scaled the image (exact for the synthetic sizes, which need no resizing)."""
    ids = torch.from_numpy(np.stack([colour_ids, kind_ids])).to(torch.uint8)  # (2, H0, W0)
    if ids.shape[1:] != (height, width):
        ids = F.interpolate(ids[None].float(), size=(height, width), mode="nearest")[0].to(torch.uint8)
    return ids


def load_patch_dataset(data_dir: str | os.PathLike, vision: VisionConfig, split: str,
                       limit: int | None = None) -> list[dict[str, Any]]:
    """The split's images (the first `limit` of them, or all) as model input plus dense labels: pixels (3, H, W),
    labels (2, H, W) uint8 per-pixel colour / kind ids, word id, and each shape's (centre y, centre x, colour id,
    kind id) in input pixels."""
    folder = Path(data_dir)
    scenes_file = folder / "scenes.json"
    if not scenes_file.is_file():
        raise FileNotFoundError(f"{scenes_file} does not exist; write the data with `monovlm data synth`")
    samples = []
    for record in json.loads(scenes_file.read_text()):
        if record["split"] != split:
            continue
        if limit is not None and len(samples) >= limit:
            break
        image = load_image(folder / record["image"], max_source_pixels=vision.max_source_pixels)
        pixels = image_to_tensor(image, vision)  # (3, H, W) at the resize policy's size
        height, width = pixels.shape[1:]
        colour_ids, kind_ids = pixel_labels(record, np.asarray(image))
        scale_y, scale_x = height / image.height, width / image.width
        centres = [(int(s["cy"] * scale_y), int(s["cx"] * scale_x), COLOUR_CLASSES.index(s["color"]),
                    KIND_CLASSES.index(s["kind"])) for s in record.get("shapes", [])]
        samples.append({
            "pixels": pixels,
            "labels": _label_maps(colour_ids, kind_ids, height, width),
            "word": WORD_CLASSES.index(record["word"]) if record.get("word") else 0,
            "centres": centres,
        })
    return samples


def _coverage(ids: torch.Tensor, classes: int, patch: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, rows, cols, classes): the share of each patch that each class covers."""
    one_hot = F.one_hot(ids.long(), classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    return F.avg_pool2d(one_hot, patch).permute(0, 2, 3, 1)  # (B, rows, cols, K)


def _collate(
    samples: list[dict[str, Any]], patch: int, shifts: list[tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """Stack same-size samples into a batch with soft per-patch targets; `shifts` translates image and labels
    together (augmentation: the same shape must be recognised at every offset to the patch grid)."""
    shifts = shifts or [(0, 0)] * len(samples)
    pixels = torch.stack([shift_image(s["pixels"], dy, dx) for s, (dy, dx) in zip(samples, shifts)])  # (B, 3, H, W)
    labels = torch.stack([shift_image(s["labels"], dy, dx) for s, (dy, dx) in zip(samples, shifts)])  # (B, 2, H, W)
    height, width = pixels.shape[2:]
    centres = [(b, min(max(y + dy, 0), height - 1) // patch, min(max(x + dx, 0), width - 1) // patch, colour, kind)
               for b, (s, (dy, dx)) in enumerate(zip(samples, shifts)) for y, x, colour, kind in s["centres"]]
    return {
        "pixels": pixels,
        "colour": _coverage(labels[:, 0], len(COLOUR_CLASSES), patch),  # (B, rows, cols, Kc)
        "kind": _coverage(labels[:, 1], len(KIND_CLASSES), patch),  # (B, rows, cols, Kk)
        "word": torch.tensor([s["word"] for s in samples]),  # (B,)
        "centres": torch.tensor(centres, dtype=torch.long).view(-1, 5),  # (M, 5): image, row, col, colour, kind
    }


class PretrainHeads(nn.Module):
    """Linear read-outs used only for pre-training (discarded after): per-patch colour and kind, per-image word."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, len(COLOUR_CLASSES))
        self.kind = nn.Linear(width, len(KIND_CLASSES))
        self.word = nn.Linear(width, len(WORD_CLASSES))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B, rows, cols, W) -> logits: colour (B, rows, cols, Kc), kind (B, rows, cols, Kk), word (B, Kw)."""
        return {"colour": self.colour(features), "kind": self.kind(features), "word": self.word(features.mean((1, 2)))}


def _centre_logits(logits: dict[str, torch.Tensor], centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and kind logits at each shape's centre patch, without the background class: (M, Kc-1), (M, Kk-1)."""
    image, row, col = centres[:, 0], centres[:, 1], centres[:, 2]
    return logits["colour"][image, row, col, 1:], logits["kind"][image, row, col, 1:]


def _losses(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    colour = F.cross_entropy(logits["colour"].flatten(0, 2).float(), batch["colour"].flatten(0, 2))  # soft targets
    kind = F.cross_entropy(logits["kind"].flatten(0, 2).float(), batch["kind"].flatten(0, 2))
    word = F.cross_entropy(logits["word"].float(), batch["word"])
    # Object term: a shape covers few patches, so in the dense loss its kind is a small share of the signal and the
    # ViT learns colour (one patch suffices) long before shape (needs the outline across patches). Asking for the
    # kind and colour of every shape at its centre patch gives each object equal weight.
    centres = batch["centres"]
    if len(centres):
        centre_colour, centre_kind = _centre_logits(logits, centres)
        objects = (F.cross_entropy(centre_colour.float(), centres[:, 3] - 1)
                   + F.cross_entropy(centre_kind.float(), centres[:, 4] - 1))
    else:
        objects = logits["kind"].sum() * 0.0  # a batch of mazes: no shapes
    return {"colour": colour, "kind": kind, "word": word, "objects": objects,
            "loss": colour + kind + word + objects}


def _batches(samples: list[dict[str, Any]], batch_size: int, patch: int, max_shift: int, generator: torch.Generator):
    """Endless shuffled batches of same-size images (no padding): each epoch shuffles within each size group, cuts
    batches, then shuffles the batch order; every image gets a random shift in [-max_shift, max_shift]²."""
    groups = group_by_size([s["pixels"] for s in samples])
    while True:
        epoch = []
        for indices in groups.values():
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            epoch += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for b in torch.randperm(len(epoch), generator=generator).tolist():
            shifts = torch.randint(-max_shift, max_shift + 1, (len(epoch[b]), 2), generator=generator).tolist()
            yield _collate([samples[i] for i in epoch[b]], patch, [tuple(shift) for shift in shifts])


def _learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_patches(
    vit: ViT, heads: PretrainHeads, samples: list[dict[str, Any]], batch_size: int = 64
) -> dict[str, float]:
    """Accuracies of the heads against the plurality label of each patch (background competes, so a patch counts
    as a shape when the shape covers more of it than anything else):
    - colour / kind: over all patches; foreground_colour / foreground_kind: over patches whose label is not
      background; shape_colour / shape_kind: at each shape's centre patch, the best non-background class;
    - word: per image (including "none")."""
    was_training = vit.training
    vit.eval()
    heads.eval()
    counts: dict[str, list[int]] = {k: [0, 0] for k in
                                     ("colour", "kind", "foreground_colour", "foreground_kind", "shape_colour",
                                      "shape_kind", "word")}

    def add(name: str, correct: torch.Tensor) -> None:
        counts[name][0] += int(correct.sum())
        counts[name][1] += correct.numel()

    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        for indices in group_by_size([s["pixels"] for s in chunk]).values():
            group = [chunk[i] for i in indices]
            batch = _collate(group, vit.patch_size)
            logits = heads(vit(batch["pixels"]))
            colour_true, kind_true = batch["colour"].argmax(-1), batch["kind"].argmax(-1)  # (B, rows, cols)
            colour_pred, kind_pred = logits["colour"].argmax(-1), logits["kind"].argmax(-1)
            foreground = kind_true != 0
            add("colour", colour_pred == colour_true)
            add("kind", kind_pred == kind_true)
            add("foreground_colour", (colour_pred == colour_true)[foreground])
            add("foreground_kind", (kind_pred == kind_true)[foreground])
            add("word", logits["word"].argmax(-1) == batch["word"])
            centre_colour, centre_kind = _centre_logits(logits, batch["centres"])  # (M, Kc-1), (M, Kk-1)
            add("shape_colour", centre_colour.argmax(-1) + 1 == batch["centres"][:, 3])
            add("shape_kind", centre_kind.argmax(-1) + 1 == batch["centres"][:, 4])
    vit.train(was_training)
    return {name: correct / total if total else float("nan") for name, (correct, total) in counts.items()}


def pretrain_vit_labels(
    data_dir: str | os.PathLike,
    config: EncoderConfig,
    vision: VisionConfig,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    report: dict[str, Any] | None = None,
) -> ViT:
    """Train a ViT (patch size `vision.patch_size`, images resized by `vision`'s policy) on the synthetic data's
    train split (mazes included: their walls are a class) with dense per-patch colour/kind targets, per-shape
    centre targets and a per-image word target, images randomly shifted by up to half a patch; return the ViT in
    eval mode (the heads are discarded). Deterministic for a seed (same torch version and thread count).

    Measured (2 CPU cores, `monovlm data synth --n 2000`, width 96, depth 3, patch 8): 3000 steps at lr=2e-3 take
    about 2.5 minutes and reach, on the test split, 99% patch colour, 98% patch kind and 98% centre-patch shape
    kind accuracy.

    `report`, if given, receives: losses (per step), seconds (training time), test (evaluate_patches on the test
    split, when it has images).
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    samples = load_patch_dataset(data_dir, vision, "train")
    if not samples:
        raise ValueError(f"{Path(data_dir) / 'scenes.json'} has no train-split images")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        vit = ViT(config, vision.patch_size)
        heads = PretrainHeads(config.width)
    parameters = [p for m in (vit, heads) for p in m.parameters()]
    decay = [p for p in parameters if p.dim() >= 2]  # weight decay on matrices only, not on biases and norms
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    # shifts up to half a patch put each shape at every offset to the patch grid: 1-2k images are not enough to
    # learn shape kinds translation-invariantly otherwise (the ViT over-fits and the test kind accuracy stalls)
    batches = _batches(samples, batch_size, vision.patch_size, vision.patch_size // 2,
                       torch.Generator().manual_seed(seed))
    losses = []
    vit.train()
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain vit", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr)
        batch = next(batches)
        loss = _losses(heads(vit(batch["pixels"])), batch)
        optimizer.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss["loss"].item())
        if progress and step % 10 == 0:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in loss.items()})
    seconds = time.perf_counter() - started
    vit.eval()
    if report is not None:
        report["losses"] = losses
        report["seconds"] = seconds
        test = load_patch_dataset(data_dir, vision, "test")
        if test:
            report["test"] = evaluate_patches(vit, heads, test)
            if progress:
                print("pretrain vit test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["test"].items()))
    return vit


# ---------------------------------------------------------------------------------------------------------------------
# "mae": masked patch prediction on any images


class MAEDecoder(nn.Module):
    """MAE's light decoder (pretraining only, discarded after): visible features -> pixels of every patch.

    The encoder's visible features are projected to the decoder's width and put back at their grid places; every
    hidden place gets the one learned mask token; sin-cos positions are added (the mask token alone does not say
    where it is), then `depth` ViT blocks and a linear head to the patch's pixels in `patchify` order (ph, pw, C).
    Kept small so the encoder, not the decoder, has to carry the content: its features are what the teacher gives."""

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, patch_size: int):
        super().__init__()
        self.width = width
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        block_config = EncoderConfig(width=width, depth=depth, heads=heads)
        self.blocks = nn.ModuleList(Block(block_config) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """visible (B, K, encoder_width) at grid indices keep (B, K) -> predicted pixels (B, rows*cols, p*p*3)."""
        batch = visible.shape[0]
        x = self.mask_token.to(visible.dtype).expand(batch, rows * cols, self.width).clone()  # (B, N, w)
        x = x.scatter(1, keep[..., None].expand(-1, -1, self.width), self.embed(visible))
        x = x + sincos_position_embedding(rows, cols, self.width).to(x.device, x.dtype).view(rows * cols, self.width)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, N, p*p*3)


def masked_patch_loss(vit: ViT, decoder: MAEDecoder, pixels: torch.Tensor, mask_ratio: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """pixels (B, 3, H, W) -> (summed squared error over the hidden patches' pixel values, number of those values).

    A sum, not a mean, so a batch of several image sizes (one call per size) adds up to one mean over all hidden
    pixels. Each image hides its own random `mask_ratio` of the patches (at least one kept, at least one hidden)."""
    tokens = vit.embed(pixels)  # (B, rows, cols, W)
    batch, rows, cols, width = tokens.shape
    count = rows * cols
    kept = min(max(1, round(count * (1.0 - mask_ratio))), count - 1) if count > 1 else 1
    order = torch.rand(batch, count, generator=generator).argsort(dim=1).to(pixels.device)  # (B, N) random per image
    keep, hidden = order[:, :kept], order[:, kept:]  # (B, K), (B, N-K)
    visible = tokens.reshape(batch, count, width).gather(1, keep[..., None].expand(-1, -1, width))  # (B, K, W)
    predicted = decoder(vit.encode(visible), keep, rows, cols)  # (B, N, p*p*3)
    target = patchify(pixels, vit.patch_size).reshape(batch, count, -1)  # (B, N, p*p*3)
    if count == 1:  # nothing to hide: reconstruct the one patch (degenerate, but keeps a 1-patch image usable)
        hidden = keep
    index = hidden[..., None].expand(-1, -1, target.shape[-1])
    error = (predicted.gather(1, index).float() - target.gather(1, index).float()).pow(2)
    return error.sum(), error.numel()


def pretrain_vit_mae(
    images: Sequence[DataImage],
    config: EncoderConfig,
    vision: VisionConfig,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    mask_ratio: float = 0.75,
    decoder_depth: int = 2,
    cache_bytes: int = 512 * 2**20,
    progress: bool = True,
    report: dict[str, Any] | None = None,
) -> ViT:
    """Train a ViT (patch `vision.patch_size`, images at `vision`'s resize policy) by masked patch prediction on
    `images`; return it in eval mode (the decoder is discarded). Images of several sizes in one batch run as one
    forward per size. Each image is randomly shifted by up to half a patch (edges repeated), so a feature describes
    what is in a patch at any offset to the grid. Loaded images are kept in memory up to `cache_bytes` (the
    synthetic suite fits whole; a large data set is re-read from disk). Unreadable images are skipped and counted.
    Deterministic for a seed (same torch version and thread count).

    The decoder is half the encoder's width (at least 32), `decoder_depth` blocks.

    `report`, if given, receives: losses (per step: mean squared error on the hidden patches' normalised pixels),
    seconds, images (how many were read) and skipped (the unreadable-image summary).
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be between 0 and 1 (exclusive)")
    if not images:
        raise ValueError("masked patch pretraining needs images; the data files name none")
    decoder_width = max(32, config.width // 2 // 4 * 4)  # a multiple of 4 for the 2-D sin-cos positions
    decoder_heads = max(1, min(config.heads, decoder_width // 16))
    while decoder_width % decoder_heads:
        decoder_heads -= 1
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        vit = ViT(config, vision.patch_size)
        decoder = MAEDecoder(config.width, decoder_width, decoder_depth, decoder_heads, vision.patch_size)
    parameters = [p for m in (vit, decoder) for p in m.parameters()]
    decay = [p for p in parameters if p.dim() >= 2]  # weight decay on matrices only, not on biases and norms
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    skipped = SkipReport()
    cache: dict[int, torch.Tensor] = {}
    unreadable: set[int] = set()
    cached_bytes = 0

    def load(indices: list[int]) -> list[torch.Tensor]:
        nonlocal cached_bytes
        loaded = []
        for index in indices:
            if index in unreadable:
                continue
            pixels = cache.get(index)
            if pixels is None:
                found = list(iter_pixels([images[index]], vision, skipped))
                if not found:
                    unreadable.add(index)
                    continue
                pixels = found[0][1]
                if cached_bytes + pixels.numel() * pixels.element_size() <= cache_bytes:
                    cache[index] = pixels
                    cached_bytes += pixels.numel() * pixels.element_size()
            loaded.append(pixels)
        return loaded

    def batches():
        while True:  # endless epochs, each a fresh permutation
            order = torch.randperm(len(images), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                yield order[start:start + batch_size]

    max_shift = vision.patch_size // 2
    losses = []
    vit.train()
    decoder.train()
    started = time.perf_counter()
    stream = batches()
    bar = tqdm(range(steps), desc="pretrain vit (mae)", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr)
        pixels = []
        for _ in range(len(images) + 1):  # a batch whose images are all unreadable: draw the next one
            pixels = load(next(stream))
            if pixels or len(unreadable) == len(images):
                break
        if not pixels:
            raise ValueError(f"none of the {len(images)} images could be read:\n{skipped.summary()}")
        shifts = torch.randint(-max_shift, max_shift + 1, (len(pixels), 2), generator=generator).tolist()
        pixels = [shift_image(image, dy, dx) for image, (dy, dx) in zip(pixels, shifts)]
        total, values = 0.0, 0
        for indices in group_by_size(pixels).values():
            error, count = masked_patch_loss(vit, decoder, torch.stack([pixels[i] for i in indices]), mask_ratio,
                                             generator)
            total, values = total + error, values + count
        loss = total / values
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress and step % 10 == 0:
            bar.set_postfix({"loss": f"{losses[-1]:.4f}"})
    vit.eval()
    if progress and skipped.skipped:
        print(f"pretrain vit (mae): {skipped.summary()}")
    if report is not None:
        report["losses"] = losses
        report["seconds"] = time.perf_counter() - started
        report["images"] = len(images) - len(unreadable)
        report["skipped"] = skipped.summary()
    return vit


# ---------------------------------------------------------------------------------------------------------------------
# Either objective


def pretrain_vit(
    data_root: str | os.PathLike,
    config: EncoderConfig,
    vision: VisionConfig,
    steps: int,
    objective: str = "mae",
    sources: Sequence[DataSource | str] | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    report: dict[str, Any] | None = None,
    questions: int = 0,
    confidence: float = 0.9,
    even_answers: bool = False,
    autocast: torch.dtype | None = None,
    open_questions: int = 0,
    head: str = "film",
) -> ViT:
    """Pretrain a ViT with `objective` (see the module docstring): "mae" on the images that the LLaVA data files
    `sources` ((file, image root) pairs or file names, relative to `data_root`) name; "labels" on `data_root`'s
    synthetic scenes.json (its train split; `sources` is not read). `questions`, `open_questions`, `confidence`,
    `even_answers`: "qa" only, the yes/no and open questions its classifier then asks of each image; `autocast`: "qa"
    only, its CPU autocast dtype, and `head`, its classifier's head (see `pretrain_vit_qa`)."""
    if (questions or open_questions) and objective != "qa":
        raise ValueError(f"only the 'qa' objective's classifier answers questions; {objective!r} was asked to")
    if objective == "labels":
        return pretrain_vit_labels(data_root, config, vision, steps, batch_size=batch_size, lr=lr, seed=seed,
                                   progress=progress, report=report)
    if objective not in ("mae", "qa"):
        raise ValueError(f"unknown ViT pretraining objective {objective!r}; objectives are {OBJECTIVES}")
    if not sources:
        raise ValueError(f"the {objective!r} objective reads the recipe's data files; none were given")
    if objective == "qa":
        return pretrain_vit_qa(data_root, sources, config, vision, steps, lr=lr, seed=seed, progress=progress,
                               report=report, teacher_questions=questions, confidence=confidence,
                               even_answers=even_answers, autocast=autocast, open_questions=open_questions,
                               head=head)
    listing = SkipReport()
    images = data_images(data_root, sources, listing)
    if progress and listing.skipped:
        print(f"pretrain vit (mae): records of the data files: {listing.summary()}")
    return pretrain_vit_mae(images, config, vision, steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                            report=report)
