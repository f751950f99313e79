"""Which parameters train: explicit parts with trainable flags, and decay only on matrices.

Every parameter belongs to exactly one part, decided by its name:
- `embedder`  — the encoder-free pixel embedder (`embedder.*` of EncoderFreeVLM);
- `encoder` / `projector` — the baseline's ViT and MLP projector (`embedder.encoder.*`, `embedder.projector.*`);
- `experts`   — the decoder's vision-only weights: expert copies (`decoder.layers.*.vision*`,
  `decoder.layers.*.attn.vision.*`) and native RoPE's grid-position q/k (`decoder.layers.*.attn.hw.*`);
- `pre_buffer` — the decoder's first `pre_buffer_layers` layers (NEO's pre-buffer, experts included);
- `decoder`   — every other decoder weight (the language model);
- `align`     — EVE's patch-align head (`aligner.*`, training only);
- `visual_qa` — the auxiliary question-answering head on the visual tokens (`visual_qa_head.*`, training only).
One part of `decoder` can also be trained on its own: `attention`, the language model's attention (q/k/v/o and q/k
norms of every layer, not the experts' copies) — Mono-InternVL's EViP unfreezes it before the rest of the LLM.
Frozen parts get `requires_grad=False`, so they get no gradients and no optimizer state.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

_EXPERT = re.compile(r"^decoder\.layers\.\d+\.(vision_|attn\.vision\.|attn\.hw\.)")
_SHARED_ATTENTION = re.compile(r"^decoder\.layers\.\d+\.attn\.(?!vision\.|hw\.)")


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def part_of(name: str, pre_buffer_layers: int = 0) -> str:
    name = name.removeprefix("model.")  # inside the trainer's wrapper the VLM is `model`
    layer = _LAYER.match(name)
    if layer is not None and int(layer.group(1)) < pre_buffer_layers:
        return "pre_buffer"
    if name.startswith("aligner."):
        return "align"
    if name.startswith("visual_qa_head."):
        return "visual_qa"
    if name.startswith("embedder.encoder."):
        return "encoder"
    if name.startswith("embedder.projector."):
        return "projector"
    if name.startswith("embedder."):
        return "embedder"
    if _EXPERT.match(name):
        return "experts"
    if name.startswith("decoder."):
        return "decoder"
    raise ValueError(f"parameter {name!r} belongs to no known part")


def pre_buffer_of(module: nn.Module) -> int:
    """How many of the decoder's first layers are NEO's pre-buffer, in a VLM, a decoder or the trainer's wrapper."""
    for child in module.modules():
        config = getattr(child, "config", None)
        decoder_config = getattr(config, "decoder", config)
        if hasattr(decoder_config, "pre_buffer_layers"):
            return decoder_config.pre_buffer_layers
    return 0


def trained_as(name: str, parts: list[str], pre_buffer_layers: int = 0) -> str | None:
    """The part under which parameter `name` trains in a stage that trains `parts`, or None: frozen."""
    part = part_of(name, pre_buffer_layers)
    if part in parts:
        return part
    if part == "decoder" and "attention" in parts and _SHARED_ATTENTION.match(name.removeprefix("model.")):
        return "attention"
    return None


def set_trainable(module: nn.Module, parts: list[str]) -> dict[str, int]:
    """Freeze everything outside `parts`; return the number of trainable parameters per part."""
    counts: dict[str, int] = defaultdict(int)
    pre_buffer = pre_buffer_of(module)
    for name, param in module.named_parameters():
        part = trained_as(name, parts, pre_buffer)
        param.requires_grad_(part is not None)
        if part is not None:
            counts[part] += param.numel()
    return dict(counts)


def param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups per (part, decay): matrices (≥ 2-D) decay, vectors (norms, biases) and nothing frozen do not.

    Each group carries its part name and peak lr ("peak_lr") so the schedule can scale all groups together."""
    groups: dict[tuple[str, bool], list[torch.Tensor]] = defaultdict(list)
    pre_buffer = pre_buffer_of(module)
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups[(part_of(name, pre_buffer), param.dim() >= 2)].append(param)
    return [{"params": params, "lr": lr, "peak_lr": lr, "part": part, "weight_decay": weight_decay if decays else 0.0}
            for (part, decays), params in sorted(groups.items())]
