"""Fourier-VLM-style compression: low-pass each image's patch grid with a 2-D DCT and resample it to a smaller grid.

Per image and channel, the rows × cols grid of hidden states (at `layer`, 0 = the image embeddings) is transformed
with an orthonormal DCT-II, only the lowest m_r × m_c frequencies are kept, and an m_r × m_c inverse DCT gives the
new tokens — ideal low-pass resampling, scaled so a constant grid stays the same constant. The whole map is one
matrix (kron of the row and column maps), applied as a merge. The new tokens take the places (and positions) of a
regular m_r × m_c subsample of the grid (`uniform_grid.lattice_lines`); the lattice shape is the one closest to the
budget, so the count can differ slightly from it. Parameter-free and content-agnostic; the paper fine-tunes after
compressing, so training-free use may lose more than the other methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monovlm.infer.reduction.base import ImageChoice, OneLayerMethod, ReductionContext
from monovlm.infer.reduction.uniform_grid import lattice_lines, lattice_shape


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n), float64: coefficients = D @ x."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def low_pass_resample(n: int, m: int) -> torch.Tensor:
    """(m, n) map: keep the m lowest DCT frequencies of n samples, inverse-transform at m samples, keep the mean."""
    return math.sqrt(m / n) * dct_matrix(m).T @ dct_matrix(n)[:m]


@dataclass
class Fourier(OneLayerMethod):
    name = "fourier"
    def select(self, ctx: ReductionContext) -> list[ImageChoice]:
        choices = []
        for image in ctx.images:
            if not image.complete:
                raise ValueError(f"fourier needs each image's full grid, but image {image.index} has "
                                 f"{image.patches.numel()} of {image.num_patches} patches left; run it first")
            m_rows, m_cols = lattice_shape(image.rows, image.cols, image.budget(self.keep))
            if (m_rows, m_cols) == (image.rows, image.cols):
                choices.append(ImageChoice(image.index, image.patches))  # all frequencies kept: nothing to do
                continue
            mix = torch.kron(low_pass_resample(image.rows, m_rows), low_pass_resample(image.cols, m_cols))
            lattice = (lattice_lines(image.rows, m_rows)[:, None] * image.cols
                       + lattice_lines(image.cols, m_cols)[None, :]).flatten()  # row-major, like the patches
            device = image.patches.device
            choices.append(ImageChoice(image.index, image.patches[lattice.to(device)], image.patches,
                                       mix.to(device=device, dtype=torch.float32)))
        return choices
