"""A small Vision Transformer of our own: the encoder of the LLaVA-style baseline and EVE's teacher.

- `ViT`: Conv2d patch stem, fixed 2-D sin-cos position embeddings (any rows × cols: native aspect ratios, no
  padding, no learned table to interpolate), pre-LayerNorm blocks with bidirectional attention, final LayerNorm.
- `save_vit` / `load_vit`: a folder with `vit.json` (EncoderConfig + patch_size) and `vit.safetensors`.

The baseline's embedder around it (ViT -> projector) is `monovlm.model.embedders.EncoderEmbedder`; its offline
pre-training (masked patch prediction on any images, or the synthetic data's dense labels) is
`monovlm.train.vit_pretrain`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from monovlm.config import ConfigError, EncoderConfig
from monovlm.data.images import group_by_size

VIT_CONFIG_FILE = "vit.json"
VIT_WEIGHTS_FILE = "vit.safetensors"
VIT_MODEL_TYPE = "monovlm-vit"


# ---------------------------------------------------------------------------------------------------------------
# The encoder


def sincos_position_embedding(rows: int, cols: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE style) -> (rows, cols, width).

    The first half of the channels encodes the row, the second half the column, each as sin/cos of the integer
    index at width/4 geometric frequencies. Being a function rather than a table, it exists for every grid size.
    """
    if width % 4:
        raise ConfigError(f"encoder width={width} must be divisible by 4 for 2-D sin-cos position embeddings")
    quarter = width // 4
    frequencies = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (W/4,)

    def encode(length: int) -> torch.Tensor:
        angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies  # (L, W/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, W/2)

    row_part = encode(rows)[:, None, :].expand(rows, cols, width // 2)
    col_part = encode(cols)[None, :, :].expand(rows, cols, width // 2)
    return torch.cat([row_part, col_part], dim=-1).float()  # (rows, cols, W)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patches of one image (no mask: every patch sees all)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        hidden = int(round(config.width * config.mlp_ratio))
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, hidden), nn.GELU(), nn.Linear(hidden, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _halvings(patch_size: int, stem: str) -> int:
    """log2(patch_size): how many times a stem halves the image to reach one pixel per patch."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 2**steps != patch_size:
        raise ConfigError(f"a {stem} stem needs a power-of-two patch size >= 2, got {patch_size}")
    return steps


def conv_stem(width: int, patch_size: int, depth: int = 1) -> nn.Sequential:
    """pixels (B, 3, H, W) -> (B, width, H/patch, W/patch) through log2(patch) stride-2 3×3 convs (channels doubling
    up to width/2, GELU after each), each followed by `depth - 1` more 3×3 convs at its resolution, and a 1×1 conv to
    `width`."""
    steps = _halvings(patch_size, "conv")
    if depth < 1:
        raise ConfigError(f"a conv stem needs depth >= 1 (3×3 convs per halving), got {depth}")
    layers: list[nn.Module] = []
    channels = 3
    for index in range(steps):
        out = max(16, width // 2 ** (steps - index))
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(out, out, 3, padding=1), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that, once its parameters are frozen (a stage that does not train its part), normalises with the
    running statistics it was trained to and leaves them as they are, as at inference — in training mode too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.weight.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def cnn_stem(width: int, patch_size: int) -> nn.Sequential:
    """pixels (B, 3, H, W) -> (B, width, H/patch, W/patch) through a small CNN (a VQA baseline's image tower): a
    stride-2 5×5 conv to 32 channels and a 3×3 conv to 64, then per further halving a 2×2 max-pool and a 3×3 conv to
    `width`, each conv with BatchNorm and ReLU, and a 1×1 conv to `width`. Its features see 39 px around a patch of 8
    (whole shapes), and it learns kinds of shape from a few thousand images far sooner than the "conv" stem."""
    steps = _halvings(patch_size, "cnn")

    def conv(channels_in: int, channels_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=kernel // 2),
                BatchNorm2d(channels_out), nn.ReLU()]

    layers = conv(3, 32, 5, stride=2) + conv(32, 64, 3)
    channels = 64
    for _ in range(steps - 1):
        layers += [nn.MaxPool2d(2)] + conv(channels, width, 3)
        channels = width
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


def patch_stem(config: EncoderConfig, patch_size: int) -> nn.Module:
    """The encoder's patch stem (see EncoderConfig.stem)."""
    if config.stem == "conv":
        return conv_stem(config.width, patch_size, config.stem_depth)
    if config.stem == "cnn":
        return cnn_stem(config.width, patch_size)
    return nn.Conv2d(3, config.width, patch_size, stride=patch_size)


class ViT(nn.Module):
    """pixels (B, 3, H, W) -> patch features (B, H/patch, W/patch, width); `features` takes images of mixed sizes."""

    def __init__(self, config: EncoderConfig, patch_size: int):
        super().__init__()
        if patch_size <= 0:
            raise ConfigError(f"patch_size={patch_size} must be positive")
        sincos_position_embedding(1, 1, config.width)  # fail at construction, not at the first forward
        self.config = config
        self.patch_size = patch_size
        self.patch_embed = patch_stem(config, patch_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        # the cnn stem keeps PyTorch's conv init (BatchNorm follows each conv): with it a teacher learnt kinds of shape
        # sooner than with xavier's (docs/experiments.md)
        own_init = set(self.patch_embed.modules()) if config.stem == "cnn" else set()
        self.apply(lambda module: None if module in own_init else _init_weights(module))

    @property
    def width(self) -> int:
        return self.config.width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), sides multiples of patch_size -> patch features (B, rows, cols, width)."""
        tokens = self.embed(pixels)  # (B, rows, cols, W)
        batch, rows, cols, _ = tokens.shape
        return self.encode(tokens.reshape(batch, rows * cols, self.width)).view(batch, rows, cols, self.width)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> patch tokens with their positions added (B, rows, cols, width), before the blocks.

        Split from `encode` so that masked-patch pretraining can run the blocks on a subset of the tokens (each
        token carries its own position, so any subset is a valid input)."""
        height, width_px = pixels.shape[-2:]
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(f"image of size {height}x{width_px} is not a multiple of patch_size={self.patch_size}")
        x = self.patch_embed(pixels).permute(0, 2, 3, 1)  # (B, rows, cols, W)
        rows, cols = x.shape[1:3]
        return x + sincos_position_embedding(rows, cols, self.width).to(x.device, x.dtype)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, width) from `embed` (all of them, or any subset) -> features (B, N, width)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images [(3, H, W), ...] of any sizes -> [(rows, cols, width), ...]; same-size images share one batch."""
        outputs: list[torch.Tensor | None] = [None] * len(images)
        for indices in group_by_size(images).values():
            grids = self(torch.stack([images[i] for i in indices]))  # (B, rows, cols, W)
            for row, index in enumerate(indices):
                outputs[index] = grids[row]
        return outputs  # type: ignore[return-value]


def _init_weights(module: nn.Module) -> None:
    # ViT/MAE practice: xavier-uniform linear layers and (flattened) patch stem, zero biases; LayerNorm stays (1, 0).
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_vit(vit: ViT, path: str | os.PathLike) -> Path:
    """Write `path/vit.json` (EncoderConfig + patch_size) and `path/vit.safetensors`; return the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": VIT_MODEL_TYPE, "encoder": vit.config.to_dict(), "patch_size": vit.patch_size}
    (folder / VIT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in vit.state_dict().items()}
    save_file(tensors, str(folder / VIT_WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_vit(path: str | os.PathLike) -> ViT:
    """Strict: every tensor present with its shape, nothing extra; errors name the file and the tensor."""
    from monovlm.model.hf import CheckpointError, load_safetensors_strict, read_json

    folder = Path(path)
    if not folder.is_dir():
        reason = "does not exist" if not folder.exists() else "is not a folder"
        raise CheckpointError(f"ViT folder {folder} {reason}")
    config_file, weights = folder / VIT_CONFIG_FILE, folder / VIT_WEIGHTS_FILE
    values = read_json(config_file)
    if values.get("model_type") != VIT_MODEL_TYPE:
        raise CheckpointError(f"{config_file} is not a monovlm ViT config (model_type {values.get('model_type')!r})")
    try:
        vit = ViT(EncoderConfig(**values["encoder"]), int(values["patch_size"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_file} has an invalid encoder config: {error}") from error
    load_safetensors_strict(vit, weights)
    return vit
