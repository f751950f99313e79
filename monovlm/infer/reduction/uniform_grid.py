"""Uniform-grid baseline: keep the patches on a regular lattice of each image's grid (content-blind, spatially even).

The lattice has m_r × m_c points, the grid shape closest to the budget with the image's aspect ratio, so the count
kept can differ from the budget by a little (e.g. 30 instead of 32 of an 8×8 grid); accounting counts what was kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext


def lattice_shape(rows: int, cols: int, count: int) -> tuple[int, int]:
    """(m_r, m_c) with m_r·m_c close to count and m_r / m_c close to rows / cols, 1 <= m_r <= rows, 1 <= m_c <= cols."""
    m_rows = min(rows, max(1, math.floor(math.sqrt(count * rows / cols) + 0.5)))
    m_cols = min(cols, max(1, math.floor(count / m_rows + 0.5)))
    return m_rows, m_cols


def lattice_lines(size: int, count: int) -> torch.Tensor:
    """count indices spread evenly over range(size): the centres of count equal bins."""
    return ((torch.arange(count) * 2 + 1) * size) // (2 * count)


@dataclass
class UniformGrid(OneLayerMethod):
    name = "uniform"
    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        choices = []
        for image in ctx.images:
            m_rows, m_cols = lattice_shape(image.rows, image.cols, image.budget(self.keep))
            device = image.patches.device
            on_lattice = (torch.isin(image.grid_row, lattice_lines(image.rows, m_rows).to(device))
                          & torch.isin(image.grid_col, lattice_lines(image.cols, m_cols).to(device)))
            choices.append(ImageChoice(image.index, image.patches[on_lattice]))
        return choices
