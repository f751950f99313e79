"""The one place where a reduction is applied: drop (or merge) visual tokens, keep or renumber positions, re-pad the
batch on the left, and hand the decoder what it needs to rebuild masks, RoPE, expert routing and the KV cache.

`Reducer` is what the reduced forward (`forward.py`) calls during a prefill: `start` with the prompt's positions and
segments, then `reduce(layer, hidden, decoder)` before each of its hook layers, which returns `ReducedTokens` or None
(nothing changed). It keeps every per-token tensor (`Tokens`) in step with the hidden states and records the
decisions in a `Trace`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, ReductionContext, Tokens
from monovlm.model.masks import position_ids_from_segments


@dataclass
class ReducedTokens:
    """What the decoder continues with after a reduction (all (B, T') but the shift)."""

    hidden: torch.Tensor  # (B, T', C)
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    vision_mask: torch.Tensor
    position_shift: torch.Tensor | None  # (B,) renumbering only: subtract from the positions of later tokens
    grid_positions: torch.Tensor | None = None  # (B, T', 2) native RoPE: each kept token's grid row and column


@dataclass
class Stage:
    """One applied reduction, in original token indices (positions in the forward's input sequence)."""

    layer: int
    choices: list[ImageChoice]  # keep / sources as original indices, mix as given
    kept: list[torch.Tensor]  # per row: original indices of every real token kept (text and structural included)


@dataclass
class Trace:
    """The decisions of one forward: which tokens each stage kept, from which layer on."""

    method: str
    num_layers: int
    prompt_tokens: list[int]  # real (non-padding) tokens per row before any reduction
    stages: list[Stage]

    def tokens_per_layer(self) -> list[list[int]]:
        """Per row, the real tokens each layer processed (and caches): rows × layers."""
        counts = []
        for row, full in enumerate(self.prompt_tokens):
            per_layer, current, stages = [], full, iter(self.stages)
            stage = next(stages, None)
            for layer in range(self.num_layers):
                while stage is not None and stage.layer <= layer:
                    current, stage = stage.kept[row].numel(), next(stages, None)
                per_layer.append(current)
            counts.append(per_layer)
        return counts


def _check_choice(choice: ImageChoice, tokens: Tokens, row: int, method: str) -> None:
    present = tokens.patch_mask[row] & (tokens.image_index[row] == choice.image)
    for name, positions in (("keep", choice.keep), ("sources", choice.sources)):
        if positions is not None and not bool(present[positions].all()):
            raise ValueError(f"{method}: its {name} for image {choice.image} name tokens that are not patches of "
                             "that image (text and structural tokens are never dropped or merged)")
    if (choice.mix is None) != (choice.sources is None):
        raise ValueError(f"{method}: a merge needs both sources and mix weights (image {choice.image})")
    if choice.mix is not None and tuple(choice.mix.shape) != (choice.keep.numel(), choice.sources.numel()):
        raise ValueError(f"{method}: mix for image {choice.image} has shape {tuple(choice.mix.shape)}, expected "
                         f"(kept, sources) = ({choice.keep.numel()}, {choice.sources.numel()})")


def renumbered(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Contiguous positions for the tokens of each document, starting where the document started. (B, T)."""
    rank = position_ids_from_segments(segment_ids)  # 0, 1, 2, ... within each document
    slots = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    doc_start = torch.where((rank == 0) & (segment_ids != 0), slots, torch.zeros_like(slots)).cummax(dim=1).values
    return torch.where(segment_ids != 0, rank + position_ids.gather(1, doc_start), torch.zeros_like(rank))


def apply_choices(hidden: torch.Tensor, tokens: Tokens, choices: dict[int, ImageChoice], rows: dict[int, int],
                  positions: str) -> tuple[torch.Tensor, Tokens, torch.Tensor | None]:
    """Keep the chosen patches (merged where a choice says so), every other real token, and re-pad on the left.
    Images without a choice keep all their patches. Returns (hidden (B, T', C), tokens, position shift or None)."""
    keep = (tokens.segment_ids != 0) & ~tokens.patch_mask  # text, structural tokens: always
    chosen_images = torch.tensor(list(choices) or [-1], device=hidden.device)
    keep |= tokens.patch_mask & ~torch.isin(tokens.image_index, chosen_images)  # images nobody chose for: all kept
    merged = hidden
    for image, choice in choices.items():
        row = rows[image]
        keep[row, choice.keep] = True
        if choice.mix is not None:
            if merged is hidden:
                merged = hidden.clone()
            merged[row, choice.keep] = choice.mix.to(hidden.dtype) @ hidden[row, choice.sources]
    counts = keep.sum(dim=1)  # (B,)
    width = int(counts.max())
    batch, length = keep.shape
    slot = keep.long().cumsum(dim=1) - 1 + (width - counts)[:, None]  # destination of each kept token, right-aligned
    index = torch.zeros(batch, width, dtype=torch.long, device=hidden.device)
    row_of = torch.arange(batch, device=hidden.device)[:, None].expand(batch, length)
    index[row_of[keep], slot[keep]] = torch.arange(length, device=hidden.device).expand(batch, length)[keep]
    pad = torch.arange(width, device=hidden.device)[None] < (width - counts)[:, None]  # (B, T')
    new_tokens = tokens.gather(index, pad)
    new_hidden = merged.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])).masked_fill(pad[..., None], 0)
    shift = None
    if positions == "renumber":
        full_next = tokens.position_ids[:, -1] + 1
        new_tokens.position_ids = renumbered(new_tokens.segment_ids, new_tokens.position_ids)
        shift = full_next - (new_tokens.position_ids[:, -1] + 1)
    return new_hidden, new_tokens, shift


class Reducer:
    """One forward's reduction: the reduced forward calls `start`, then `reduce` before each layer in `layers`."""

    def __init__(self, reduction, layout, num_layers: int):
        self.reduction = reduction
        self.method = reduction.method
        self.layout = layout
        self.layers = frozenset(self.method.hook_layers(num_layers))
        self.memory: dict = {}
        self.tokens: Tokens | None = None
        self.shift: torch.Tensor | None = None  # accumulated over renumbering stages
        self.trace = Trace(self.method.name, num_layers, [], [])

    def start(self, position_ids: torch.Tensor, segment_ids: torch.Tensor, vision_mask: torch.Tensor | None) -> None:
        layout = self.layout
        if layout.patch_mask.shape != segment_ids.shape:
            raise ValueError(f"the visual layout covers {tuple(layout.patch_mask.shape)} tokens but the forward has "
                             f"{tuple(segment_ids.shape)}")
        batch, length = segment_ids.shape
        original = torch.arange(length, device=segment_ids.device).expand(batch, length)
        self.tokens = Tokens(
            position_ids=position_ids, segment_ids=segment_ids,
            vision_mask=vision_mask if vision_mask is not None else torch.zeros_like(layout.patch_mask),
            patch_mask=layout.patch_mask & (segment_ids != 0), image_index=layout.image_index,
            grid_row=layout.grid_row, grid_col=layout.grid_col,
            original_index=torch.where(segment_ids != 0, original, torch.full_like(original, -1)))
        self.trace.prompt_tokens = (segment_ids != 0).sum(dim=1).tolist()

    def reduce(self, layer: int, hidden: torch.Tensor, decoder) -> ReducedTokens | None:
        tokens = self.tokens
        ctx = ReductionContext(layer, hidden, tokens, decoder, self.layout.grids, self.memory)
        choices = self.method.select(ctx)
        if not choices:
            return None
        rows = {view.index: view.row for view in ctx.images}
        by_image = {}
        for choice in choices:
            if choice.image not in rows:
                raise ValueError(f"{self.method.name}: chose for image {choice.image}, which has no patches left")
            _check_choice(choice, tokens, rows[choice.image], self.method.name)
            by_image[choice.image] = choice
        if not self._changes(ctx, by_image):
            return None  # every patch kept, nothing merged: the forward goes on exactly as without reduction
        new_hidden, new_tokens, shift = apply_choices(hidden, tokens, by_image, rows, self.reduction.positions)
        if shift is not None:
            self.shift = shift if self.shift is None else self.shift + shift
        self._record(layer, tokens, new_tokens, by_image, rows)
        self.tokens = new_tokens
        grid = torch.stack([new_tokens.grid_row, new_tokens.grid_col], dim=-1).clamp(min=0)  # (B, T', 2)
        return ReducedTokens(new_hidden, new_tokens.position_ids, new_tokens.segment_ids, new_tokens.vision_mask,
                             self.shift, grid)

    @staticmethod
    def _changes(ctx: ReductionContext, choices: dict[int, ImageChoice]) -> bool:
        views = {view.index: view for view in ctx.images}
        return any(choice.mix is not None or choice.keep.unique().numel() < views[image].patches.numel()
                   for image, choice in choices.items())

    def _record(self, layer: int, before: Tokens, after: Tokens, choices: dict[int, ImageChoice],
                rows: dict[int, int]) -> None:
        recorded = []
        for image, choice in choices.items():
            original = before.original_index[rows[image]]
            recorded.append(ImageChoice(image, original[choice.keep],
                                        original[choice.sources] if choice.sources is not None else None,
                                        choice.mix))
        kept = [row[row >= 0] for row in after.original_index]
        self.trace.stages.append(Stage(layer, recorded, kept))
