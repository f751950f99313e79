"""What a token-reduction method sees and what it returns.

A method (one small file each) only *chooses*: before a decoder layer it gets a `ReductionContext` — the hidden states
entering that layer, each image's patch tokens still present with their grid coordinates, and lazily computed
attention rows and keys of that layer — and returns, per image, the patches to keep (`ImageChoice`), optionally with
a merge: each kept token becomes a weighted sum of tokens of its image. `apply.py` is the one place that applies the
choice to hidden states, positions, masks and the KV cache. Text tokens and structural visual tokens (CLS, row
separators; image begin/end are text) are never offered, so no method can drop them.

Attention rows are recomputed with the layer's own pieces (`Block.attention_input`, `Attention.project_qkv`,
`Attention.probabilities`) for the few queries a method asks for (PyramidDrop's pattern): no layer runs twice, no full
attention matrix is built, and the decoder keeps using `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from monovlm.model.decoder import Decoder
from monovlm.model.experts import Routing

QUERY_CHUNK = 256  # attention rows are computed this many queries at a time (bounds memory at (H, 256, T))


def budget(num_patches: int, keep: float) -> int:
    """Patches to keep of an image that had num_patches: keep·num_patches rounded half up, at least 1."""
    return min(num_patches, max(1, math.floor(keep * num_patches + 0.5)))


def check_keep(keep: float, name: str = "keep") -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{name}={keep} must be in (0, 1]: the fraction of each image's patch tokens to keep")


def default_stage_layers(num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's stage boundaries [L/4, L/2, 3L/4] (8, 16, 24 for 32 layers), at least layer 1, deduplicated."""
    return tuple(sorted({max(1, num_layers * s // 4) for s in (1, 2, 3)} - {num_layers}))


def check_layer(layer: int, num_layers: int, method: str, what: str = "layer") -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"{method}: {what}={layer} is outside the decoder's layers 0..{num_layers - 1}")


@dataclass
class Tokens:
    """Per-token state kept in step with the hidden states; every field is (B, T). Padding slots have segment 0,
    position 0, no vision/patch flag and index -1."""

    position_ids: torch.Tensor
    segment_ids: torch.Tensor  # 0 = padding
    vision_mask: torch.Tensor  # bool: visual tokens (patches and CLS/separators), which take the vision experts
    patch_mask: torch.Tensor  # bool: droppable patches
    image_index: torch.Tensor  # the image each visual token comes from, -1 elsewhere
    grid_row: torch.Tensor
    grid_col: torch.Tensor
    original_index: torch.Tensor  # index in the forward's input sequence

    def gather(self, index: torch.Tensor, pad: torch.Tensor) -> Tokens:
        """Take slots `index` (B, T') of each row; slots where pad (B, T') is True become padding."""
        taken = {}
        for f in fields(self):
            values = getattr(self, f.name).gather(1, index)
            fill = {"position_ids": 0, "segment_ids": 0, "vision_mask": False, "patch_mask": False}.get(f.name, -1)
            taken[f.name] = values.masked_fill(pad, fill)
        return Tokens(**taken)


@dataclass
class ImageView:
    """One image as a method sees it before a layer. Positions index the current sequence of batch row `row`."""

    index: int  # the image's number in the batch (order of `images`)
    row: int  # batch row
    rows: int  # grid rows and columns the image started with
    cols: int
    patches: torch.Tensor  # (n,) long: positions of its patch tokens still present, in sequence (row-major) order
    grid_row: torch.Tensor  # (n,) long
    grid_col: torch.Tensor  # (n,) long
    original: torch.Tensor  # (n,) long: each patch's index in the forward's input sequence

    @property
    def num_patches(self) -> int:
        """Patches the image started with; budgets count from this, so stage ratios are relative to the full grid."""
        return self.rows * self.cols

    def budget(self, keep: float) -> int:
        return budget(self.num_patches, keep)

    @property
    def complete(self) -> bool:
        return self.patches.numel() == self.num_patches


@dataclass
class ImageChoice:
    """The patches of one image to keep (positions in the current sequence), and optionally how to merge: kept
    token i becomes sum_j mix[i, j] · hidden[sources[j]] (sources are patches of the same image)."""

    image: int
    keep: torch.Tensor  # (k,) long
    sources: torch.Tensor | None = None  # (n,) long
    mix: torch.Tensor | None = None  # (k, n) float


class ReductionContext:
    """Everything a method may look at before one layer; attention rows and keys are computed on demand, per row."""

    def __init__(self, layer: int, hidden: torch.Tensor, tokens: Tokens, decoder: Decoder,
                 grids: list[tuple[int, int]], memory: dict):
        self.layer = layer
        self.hidden = hidden  # (B, T, C) entering `layer`
        self.tokens = tokens
        self.decoder = decoder
        self.grids = grids
        self.memory = memory  # shared by the hooks of one forward (a method may score at one layer, drop at another)
        self._images: list[ImageView] | None = None
        self._projected: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------------------------------------
    # the images

    @property
    def images(self) -> list[ImageView]:
        """Every image of the batch with at least one patch still present."""
        if self._images is None:
            tokens = self.tokens
            rows, positions = tokens.patch_mask.nonzero(as_tuple=True)
            image_of = tokens.image_index[rows, positions]
            views = []
            for image in image_of.unique().tolist():
                selected = image_of == image
                row, where = int(rows[selected][0]), positions[selected]
                grid_rows, grid_cols = self.grids[image]
                views.append(ImageView(image, row, grid_rows, grid_cols, where, tokens.grid_row[row, where],
                                       tokens.grid_col[row, where], tokens.original_index[row, where]))
            self._images = views
        return self._images

    def last_token(self, image: ImageView) -> int:
        """Position of the last token of the image's document (the prompt's last token, unless rows are packed)."""
        segments = self.tokens.segment_ids[image.row]
        same_document = segments == segments[image.patches[0]]
        return int(same_document.nonzero().max())

    # ----------------------------------------------------------------------------------------------------------
    # memory across layers (keyed by original token index, so it survives drops in between)

    def remember(self, key: str, image: ImageView, values: torch.Tensor) -> None:
        """Store per-patch values (n,) of an image for a later layer of the same forward."""
        self.memory[(key, image.index)] = (image.original, values)

    def recall(self, key: str, image: ImageView) -> torch.Tensor:
        """The values remembered under key for the patches the image still has (n,)."""
        if (key, image.index) not in self.memory:
            raise KeyError(f"nothing remembered as {key!r} for image {image.index} before layer {self.layer}")
        original, values = self.memory[(key, image.index)]
        where = torch.searchsorted(original, image.original)
        if bool((where >= original.numel()).any()) or not torch.equal(original[where], image.original):
            raise ValueError(f"image {image.index} has patches that were not present when {key!r} was remembered")
        return values[where]

    # ----------------------------------------------------------------------------------------------------------
    # attention of this layer, recomputed for chosen queries

    def _project(self, row: int) -> tuple[torch.Tensor, Routing | None, torch.Tensor]:
        """(normed hidden (1, T, C), its expert routing, rotated keys (1, Hkv, T, D)) of one row at this layer."""
        if row not in self._projected:
            block = self.decoder.layers[self.layer]
            routing = self._routing(row, slice(None))
            normed = block.attention_input(self.hidden[row : row + 1], routing)  # (1, T, C)
            cos, sin = self.decoder.rotary(self.tokens.position_ids[row : row + 1], normed.dtype)  # (1, 1, T, D)
            _, keys, _ = block.attn.project_qkv(normed, cos, sin, routing, self._grid_rotary(row, slice(None), normed))
            self._projected[row] = (normed, routing, keys)
        return self._projected[row]

    def _grid_rotary(self, row: int, positions, normed: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Native RoPE's grid tables of one row's tokens at `positions` (each keeps its grid row and column)."""
        tokens = self.tokens
        grid = torch.stack([tokens.grid_row[row : row + 1, positions], tokens.grid_col[row : row + 1, positions]], -1)
        return self.decoder.grid_rotary(grid.clamp(min=0), normed)

    def _routing(self, row: int, positions) -> Routing | None:
        if not self.decoder.config.has_experts:
            return None
        return Routing.from_mask(self.tokens.vision_mask[row : row + 1, positions])

    def attention_rows(self, row: int, queries: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities of this layer for the query positions `queries` (Q,) of one row
        over all its keys: (Q, T). The same causal, document and padding mask as the forward; float32."""
        normed, _, keys = self._project(row)
        attn = self.decoder.layers[self.layer].attn
        segments = self.tokens.segment_ids[row]  # (T,)
        slots = torch.arange(segments.numel(), device=segments.device)
        out = []
        for chunk in queries.split(QUERY_CHUNK):
            cos, sin = self.decoder.rotary(self.tokens.position_ids[row : row + 1, chunk], normed.dtype)
            q, _, _ = attn.project_qkv(normed[:, chunk], cos, sin, self._routing(row, chunk),
                                       self._grid_rotary(row, chunk, normed[:, chunk]))  # (1, H, Q, D)
            allowed = (slots[None] <= chunk[:, None]) & (segments[None] == segments[chunk][:, None]) & (segments != 0)
            out.append(attn.probabilities(q, keys, allowed[None, None])[0].mean(dim=0))  # (Q, T)
        return torch.cat(out)

    def keys(self, row: int) -> torch.Tensor:
        """This layer's keys of one row before RoPE, averaged over heads: (T, D) — the merge metric of ToMe and
        VisionZip (RoPE would make it compare positions as much as content)."""
        normed, routing, _ = self._project(row)
        _, keys, _ = self.decoder.layers[self.layer].attn.project_qkv(normed, routing=routing)  # (1, Hkv, T, D)
        return keys[0].mean(dim=0)

    # ----------------------------------------------------------------------------------------------------------
    # the two scores the attention-based methods use

    def last_token_attention(self, image: ImageView) -> torch.Tensor:
        """Attention from the last token of the image's document to each of its patches (n,): FastV, PyramidDrop."""
        query = torch.tensor([self.last_token(image)], device=image.patches.device)
        return self.attention_rows(image.row, query)[0, image.patches]

    def received_attention(self, image: ImageView) -> torch.Tensor:
        """Mean attention each patch receives from the image's patches (n,), with causal normalisation: under a
        causal mask patch j is seen by the queries at or after it only, so its column sum is divided by their count
        (a plain mean would favour early patches). VisionDrop / HiPrune / FoPru, re-homed to the decoder."""
        rows = self.attention_rows(image.row, image.patches)[:, image.patches]  # (n queries, n keys)
        seen_by = (image.patches[None] <= image.patches[:, None]).sum(dim=0)  # (n,) queries that can see each key
        return rows.sum(dim=0) / seen_by


class Method:
    """A token-reduction method: it scores visual tokens and chooses which to keep (and maybe how to merge).

    Subclasses are dataclasses with a `keep` ratio, their layer(s) and options; `hook_layers` names the layers
    before which `select` is called (ascending), `select` returns the choices (or None to only look)."""

    name: ClassVar[str] = "method"

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        raise NotImplementedError

    def select(self, ctx: ReductionContext) -> list[ImageChoice] | None:
        raise NotImplementedError


@dataclass
class OneLayerMethod(Method):
    """A method that selects once, before decoder layer `layer` (0 = before the decoder), keeping `keep`."""

    keep: float = 0.25
    layer: int = 0

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def hook_layers(self, num_layers: int) -> tuple[int, ...]:
        check_layer(self.layer, num_layers, self.name)
        return (self.layer,)


def top_k_positions(image: ImageView, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the image's k highest-scoring patches, in sequence order."""
    k = min(k, image.patches.numel())
    return image.patches[scores.topk(k).indices.sort().values]
