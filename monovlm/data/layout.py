"""Where an image's visual tokens sit in its placeholder span: the one definition of the layout.

Every embedder lays an image out as `[CLS] row 1, SEP, row 2, SEP, ... [Q1 ... QK]`: an optional learned CLS token,
then the token grid row by row, each row optionally closed by a learned row separator, then BREEN's learnable query
tokens if any (`VisionConfig.use_cls`, `use_row_separator`, `query_grids`). The processor counts placeholders with it, the model scatters the embedder's tokens in this
order, token reduction and decoding strategies find the grid (patch) tokens with it, and the aligner picks the grid
tokens it supervises. All of them read it from `TokenLayout`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monovlm.config import VisionConfig


def pooled_grid(rows: int, cols: int, pool: int) -> tuple[int, int]:
    """TokenFLEX: the (rows, cols) of a token grid average-pooled by `pool` per side: ceil of each side / pool (the
    embedder's adaptive pooling spreads the windows evenly when a side is not a multiple of `pool`)."""
    return -(-rows // pool), -(-cols // pool)


@dataclass(frozen=True)
class TokenLayout:
    """The N visual tokens of one image: which are grid patches (what token reduction may drop) and their
    (row, col); the structural tokens (CLS, row separators, queries) have row = col = -1. The last `num_queries`
    tokens are the learnable queries."""

    rows: int
    cols: int
    is_patch: torch.Tensor  # (N,) bool
    grid_row: torch.Tensor  # (N,) long, -1 at CLS, separators and queries
    grid_col: torch.Tensor  # (N,) long, -1 at CLS, separators and queries
    num_queries: int = 0

    @classmethod
    def of(cls, rows: int, cols: int, vision: VisionConfig) -> TokenLayout:
        """The layout of a rows × cols token grid under `vision`'s CLS / row-separator settings."""
        per_row = cols + (1 if vision.use_row_separator else 0)
        grid_row = torch.arange(rows).repeat_interleave(per_row)  # (rows·per_row,)
        grid_col = torch.arange(per_row).repeat(rows)
        is_patch = grid_col < cols  # the separator closes each row
        if vision.use_cls:
            is_patch = torch.cat([torch.zeros(1, dtype=torch.bool), is_patch])
            grid_row, grid_col = F.pad(grid_row, (1, 0)), F.pad(grid_col, (1, 0))
        queries = vision.num_queries
        if queries:
            is_patch = F.pad(is_patch, (0, queries), value=False)
            grid_row, grid_col = F.pad(grid_row, (0, queries)), F.pad(grid_col, (0, queries))
        not_patch = torch.tensor(-1)
        return cls(rows, cols, is_patch, torch.where(is_patch, grid_row, not_patch),
                   torch.where(is_patch, grid_col, not_patch), queries)

    @classmethod
    def for_image(cls, image: torch.Tensor, vision: VisionConfig, pool: int | None = None) -> TokenLayout:
        """The layout of a preprocessed image (..., H, W), already at its resized size: one token per
        `pixels_per_token` × `pixels_per_token` pixels, the grid pooled by `pool` (default: `vision.token_pool`)."""
        unit = vision.pixels_per_token
        rows, cols = pooled_grid(image.shape[-2] // unit, image.shape[-1] // unit, pool or vision.token_pool)
        return cls.of(rows, cols, vision)

    @property
    def num_tokens(self) -> int:
        """N: the image's placeholder count (CLS, grid and separators)."""
        return self.is_patch.numel()

    @property
    def query_index(self) -> torch.Tensor:
        """(num_queries,) long: positions of the learnable queries in the image's N tokens (its last ones)."""
        return torch.arange(self.num_tokens - self.num_queries, self.num_tokens)

    @property
    def patch_index(self) -> torch.Tensor:
        """(rows·cols,) long: position in the image's N tokens of each grid token, in row-major grid order."""
        return self.is_patch.nonzero().squeeze(1)
