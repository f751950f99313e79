"""Pixels -> visual tokens: the three encoder-free embedders of the EVE family, and the baseline's ViT + projector.

- `linear` (Fuyu, SOLO): each raw patch, flattened, goes through one Linear into the decoder width.
- `eve` (EVE v1's patch embedding layer): a conv stem; local attention inside each merge×merge window with the
  average-pooled patch as the query; a learned CLS token that attends to every patch; an MLP into the decoder width.
- `conv` (EVEv2, NEO): conv (patch_size stride) -> GELU -> conv (merge stride), so one token covers
  (patch_size·merge)² pixels.
- `EncoderEmbedder` (the LLaVA-style baseline): ViT -> merge×merge pixel shuffle -> 2-layer MLP projector, so it
  yields exactly as many tokens as the `conv` embedder with the same VisionConfig.

`eve` and `conv` take `stem = "conv"` in place of their first strided conv: stride-2 3×3 convs down to the patch
(`"patch+conv"`: both, added), or `stem = "cnn"`: a small BatchNorm CNN (`"patch+cnn"`: it and the patch stem, added).

Every embedder returns, per image, the token sequence the decoder sees: [CLS] row 1, SEP, row 2, SEP, ... — CLS and
the row separator are learned vectors, included when the config asks for them. That order is
`monovlm.data.layout.TokenLayout`, which the processor counts placeholders with, so the length always equals
`monovlm.data.images.num_image_tokens` for that image.

Images of the same size are embedded together in one batch; different sizes go in separate groups (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.images import group_by_size
from monovlm.data.layout import TokenLayout, pooled_grid
from monovlm.model.vit import ViT, cnn_stem, conv_stem


class Embedder(nn.Module):
    """Shared layout logic: subclasses turn a batch of same-size images into a token grid (B, rows, cols, C)."""

    def __init__(self, config: VisionConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        token_width = self.layout_width()
        self.cls_token = nn.Parameter(torch.randn(token_width) * 0.02) if config.use_cls else None
        self.row_separator = nn.Parameter(torch.randn(token_width) * 0.02) if config.use_row_separator else None
        side = config.embedder_context
        self.context = nn.Conv2d(token_width, token_width, side, padding=side // 2) if side else None
        # BREEN's learnable queries, in the decoder's width: they follow the grid as they are, no embedder applies
        queries = config.num_queries
        self.queries = nn.Parameter(torch.randn(queries, hidden_size) * 0.02) if queries else None
        more = config.embedder_context_layers - 1 if side else 0
        self.more_context = nn.ModuleList(nn.Conv2d(token_width, token_width, side, padding=side // 2)
                                          for _ in range(more)) if more else None

    def layout_width(self) -> int:
        """Width of the grid tokens when CLS/separator are attached (the decoder width unless overridden)."""
        return self.hidden_size

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> grid tokens (B, rows, cols, C)."""
        raise NotImplementedError

    def with_context(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, rows, cols, C) -> the same plus a conv over each token's neighbourhood (`embedder_context`),
        `embedder_context_layers` times, each residual."""
        if self.context is None:
            return grid
        for conv in (self.context, *(self.more_context or ())):
            mixed = conv(F.gelu(grid).permute(0, 3, 1, 2))  # (B, C, rows, cols); zero padding at the border
            grid = grid + mixed.permute(0, 2, 3, 1)
        return grid

    def cls(self, grid: torch.Tensor) -> torch.Tensor:
        """The CLS token for each image (B, C); a learned constant unless a subclass lets it look at the image."""
        return self.cls_token.to(grid.dtype).expand(grid.shape[0], -1)

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """Applied to the laid-out sequence (B, N, C_layout) -> (B, N, hidden). Identity unless overridden."""
        return tokens

    def layout(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, rows, cols, C) -> sequence (B, [1 +] rows·(cols [+ 1]), C)."""
        batch, rows, cols, width = grid.shape
        if self.row_separator is not None:
            separator = self.row_separator.to(grid.dtype).expand(batch, rows, 1, width)
            grid = torch.cat([grid, separator], dim=2)  # (B, rows, cols + 1, C)
        tokens = grid.reshape(batch, -1, width)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls(grid[:, :, :cols])[:, None], tokens], dim=1)
        return tokens

    def token_layout(self, image: torch.Tensor, pool: int | None = None) -> TokenLayout:
        """The layout of the tokens `forward` returns for this image (3, H, W) pooled by `pool` (default: the
        config's token_pool): [CLS] row 1, SEP, row 2, SEP, ... [queries]"""
        return TokenLayout.for_image(image, self.config, pool)

    def forward(self, images: list[torch.Tensor], pools: list[int] | None = None) -> list[torch.Tensor]:
        """images: list of (3, H, W), sides multiples of pixels_per_token; pools: each image's TokenFLEX pooling
        factor (default: the config's token_pool) -> list of (N_i, hidden) token tensors."""
        outputs: list[torch.Tensor | None] = [None] * len(images)
        ppt = self.config.pixels_per_token
        pools = pools or [self.config.token_pool] * len(images)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for (height, width), indices in group_by_size(images).items():
            for index in indices:
                groups.setdefault((height, width, pools[index]), []).append(index)
        for (height, width, pool), indices in groups.items():
            if height % ppt or width % ppt:
                raise ValueError(f"image of size {height}x{width} is not a multiple of {ppt} pixels per token")
            pixels = torch.stack([images[i] for i in indices])  # (B, 3, H, W)
            grid = pool_grid(self.with_context(self.grid(pixels)), pool)  # (B, rows/p, cols/p, C)
            tokens = self.finish(self.layout(grid))  # (B, N, hidden)
            if self.queries is not None:
                queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (B, K, hidden)
                tokens = torch.cat([tokens, queries], dim=1)
            for row, index in enumerate(indices):
                outputs[index] = tokens[row]
        return outputs  # type: ignore[return-value]


def pool_grid(grid: torch.Tensor, pool: int) -> torch.Tensor:
    """TokenFLEX: grid (B, rows, cols, C) average-pooled to (B, ceil(rows/pool), ceil(cols/pool), C)."""
    if pool == 1:
        return grid
    rows, cols = pooled_grid(grid.shape[1], grid.shape[2], pool)
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), (rows, cols))  # (B, C, rows/p, cols/p)
    return pooled.permute(0, 2, 3, 1)


class LinearEmbedder(Embedder):
    """Fuyu / SOLO: one Linear over each flattened raw patch."""

    def __init__(self, config: VisionConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        patch = config.patch_size
        self.proj = nn.Linear(3 * patch * patch, hidden_size, bias=config.patch_bias)

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        patch = self.config.patch_size
        batch, channels, height, width = pixels.shape
        patches = pixels.reshape(batch, channels, height // patch, patch, width // patch, patch)
        patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, ph, pw, C): Fuyu's (ph, pw, C) order
        patches = patches.reshape(batch, height // patch, width // patch, patch * patch * channels)
        return self.proj(patches)  # (B, rows, cols, hidden)


def patch_stem(config: VisionConfig, bias: bool) -> nn.Module:
    """pixels (B, 3, H, W) -> (B, embedder_width, H/patch, W/patch): one strided conv (`stem = "patch"`), a conv
    stem (`stem = "conv"`), the sum of both (`"patch+conv"`), a small CNN (`"cnn"`) or the sum of it and the patch
    stem (`"patch+cnn"`)."""
    if config.stem == "cnn":
        return cnn_stem(config.embedder_width, config.patch_size)
    # only the layers the stem uses are built: an unused one would shift the initial values of every later layer
    patch = None if config.stem == "conv" else nn.Conv2d(3, config.embedder_width, config.patch_size,
                                                          stride=config.patch_size, bias=bias)
    if config.stem == "patch":
        return patch
    convs = (cnn_stem(config.embedder_width, config.patch_size) if config.stem == "patch+cnn"
             else conv_stem(config.embedder_width, config.patch_size, config.stem_depth))
    return convs if config.stem == "conv" else SummedStems(patch, convs)


class SummedStems(nn.Module):
    """Two stems side by side, their outputs added: the patch stem's linear view of each patch and the conv stem's
    (or the CNN's)."""

    def __init__(self, patch: nn.Module, convs: nn.Module):
        super().__init__()
        self.patch, self.convs = patch, convs

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch(pixels) + self.convs(pixels)  # (B, width, H/patch, W/patch)


class ConvEmbedder(Embedder):
    """EVEv2 / NEO: conv (patch_size stride) -> GELU -> conv (merge stride)."""

    def __init__(self, config: VisionConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        self.patch_conv = patch_stem(config, bias=True)
        self.merge_conv = nn.Conv2d(config.embedder_width, hidden_size, config.merge, stride=config.merge)

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.merge_conv(F.gelu(self.patch_conv(pixels)))  # (B, hidden, rows, cols)
        return features.permute(0, 2, 3, 1)  # (B, rows, cols, hidden)


class WindowAttention(nn.Module):
    """Multi-head attention of a few queries over a few keys, batched over windows: q (N, Q, C), kv (N, K, C)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"embedder_width={width} must be divisible by embedder_heads={heads}")
        self.heads = heads
        self.query_norm = nn.LayerNorm(width)
        self.key_value_norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        windows, num_queries, width = queries.shape
        head_dim = width // self.heads
        q = self.query(self.query_norm(queries)).view(windows, num_queries, self.heads, head_dim).transpose(1, 2)
        k, v = self.key_value(self.key_value_norm(keys)).chunk(2, dim=-1)
        k = k.reshape(windows, -1, self.heads, head_dim).transpose(1, 2)  # (N, heads, K, d)
        v = v.reshape(windows, -1, self.heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)  # (N, heads, Q, d)
        return self.out(attended.transpose(1, 2).reshape(windows, num_queries, width))


class EVEEmbedder(Embedder):
    """EVE v1's patch embedding layer (PEL): conv stem, local window attention, CLS global attention, MLP."""

    def __init__(self, config: VisionConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        width = config.embedder_width
        self.stem = patch_stem(config, bias=False)
        self.local_attention = WindowAttention(width, config.embedder_heads)
        self.global_attention = WindowAttention(width, config.embedder_heads) if config.use_cls else None
        self.mlp = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def layout_width(self) -> int:
        return self.config.embedder_width  # CLS and SEP live in the stem's width and go through the MLP, as in EVE

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        merge = self.config.merge
        stem = self.stem(pixels)  # (B, C, rows·m, cols·m)
        batch, width, height, width_px = stem.shape
        rows, cols = height // merge, width_px // merge
        pooled = F.avg_pool2d(stem, merge)  # (B, C, rows, cols): the query of each window
        queries = pooled.permute(0, 2, 3, 1).reshape(batch * rows * cols, 1, width)  # (N, 1, C)
        windows = stem.reshape(batch, width, rows, merge, cols, merge).permute(0, 2, 4, 3, 5, 1)
        keys = windows.reshape(batch * rows * cols, merge * merge, width)  # (N, m², C) the window's patches
        local = queries + self.local_attention(queries, keys)  # residual on the pooled patch
        return local.view(batch, rows, cols, width)

    def cls(self, grid: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, width = grid.shape
        query = self.cls_token.to(grid.dtype).expand(batch, 1, width)  # (B, 1, C)
        attended = self.global_attention(query, grid.reshape(batch, rows * cols, width))  # (B, 1, C)
        return (query + attended)[:, 0]

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)  # (B, N, hidden)


# ---------------------------------------------------------------------------------------------------------------
# The baseline's embedder: encoder + projector


def merge_patches(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """Pixel shuffle: (B, rows, cols, C) -> (B, rows/m, cols/m, C·m²), concatenating each m×m window's features
    in (row-in-window, col-in-window) order."""
    batch, rows, cols, width = grid.shape
    windows = grid.reshape(batch, rows // merge, merge, cols // merge, merge, width)
    windows = windows.permute(0, 1, 3, 2, 4, 5)  # (B, rows/m, cols/m, m, m, C)
    return windows.reshape(batch, rows // merge, cols // merge, merge * merge * width)


class Projector(nn.Module):
    """LLaVA's mlp2x_gelu after a merge×merge pixel shuffle: fewer tokens, no information thrown away."""

    def __init__(self, width: int, merge: int, hidden_size: int):
        super().__init__()
        self.merge = merge
        self.mlp = nn.Sequential(nn.Linear(width * merge * merge, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.mlp(merge_patches(grid, self.merge))  # (B, rows/m, cols/m, hidden)


class EncoderEmbedder(Embedder):
    """The LLaVA-style baseline: ViT patch features -> projector. One token covers (patch_size·merge)² pixels, as
    with ConvEmbedder, and CLS / row separators come from the base class, so token counts match exactly."""

    def __init__(self, config: VisionConfig, encoder_config: EncoderConfig, hidden_size: int):
        super().__init__(config, hidden_size)
        self.encoder = ViT(encoder_config, config.patch_size)  # separate names: frozen / trained separately
        self.projector = Projector(encoder_config.width, config.merge, hidden_size)

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(pixels))  # (B, rows/m, cols/m, hidden)


EMBEDDERS = {"linear": LinearEmbedder, "eve": EVEEmbedder, "conv": ConvEmbedder}


def build_embedder(config: VisionConfig, hidden_size: int, encoder: EncoderConfig | None = None) -> Embedder:
    """The encoder-free embedder named by the config, or — with an EncoderConfig — the baseline's ViT + projector."""
    if encoder is not None:
        return EncoderEmbedder(config, encoder, hidden_size)
    return EMBEDDERS[config.embedder](config, hidden_size)
