"""The encoder-free VLM: an embedder turns pixels into tokens, which are scattered into the decoder's token
embeddings at the image placeholder positions; one decoder does the rest.

`input_ids` hold one placeholder id per visual token (CLS and row separators included), so masks, positions, labels
and KV-cache lengths are the same arithmetic for text and images. The scatter is one vectorised `masked_scatter`:
the i-th placeholder of the batch (in row-major order) receives the i-th visual token of the images taken in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from monovlm.config import VLMConfig
from monovlm.data.layout import TokenLayout
from monovlm.model.decoder import Decoder
from monovlm.model.embedders import build_embedder
from monovlm.model.kv_cache import KVCache

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, images, padding)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "monovlm-encoder-free"


def labelled_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, output_weight: torch.Tensor,
                           reduction: str = "mean", token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (B, T, C) predicts labels shifted by one; only labelled positions go through the output head.
    `token_weights` (B, T-1), aligned with the shifted targets, scale each token's loss ("sum" only)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    selected = targets != IGNORE_INDEX
    logits = F.linear(hidden[:, :-1][selected], output_weight)  # (N_labelled, V)
    if logits.shape[0] == 0:
        return hidden.sum() * 0.0  # no labels here: a zero that keeps the graph connected
    if token_weights is None:
        return F.cross_entropy(logits.float(), targets[selected], reduction=reduction)
    if reduction != "sum":
        raise ValueError(f"token_weights need reduction='sum', got {reduction!r}")
    per_token = F.cross_entropy(logits.float(), targets[selected], reduction="none")  # (N_labelled,)
    return (per_token * token_weights[selected]).sum()


def per_sample_token_weights(labels: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Weights that turn a summed token loss into a sum of per-sample mean losses: each labelled target token gets
    1 / (labelled tokens of its sample). labels, segments (B, T) — segments as in `Batch.attention_mask` (k = k-th
    sample of the row, 0 = padding), so packed rows work. -> (weights (B, T-1) float, samples with a label)."""
    targets, target_segments = labels[:, 1:], segments[:, 1:]  # (B, T-1): the sample of each predicted token
    selected = targets != IGNORE_INDEX
    ids_per_row = int(segments.max()) + 1
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
    sample_ids = rows * ids_per_row + target_segments  # (B, T-1): one id per (row, segment)
    counts = torch.zeros(labels.shape[0] * ids_per_row, device=labels.device)
    counts.index_add_(0, sample_ids[selected], torch.ones(int(selected.sum()), device=labels.device))
    weights = torch.where(selected, 1.0 / counts[sample_ids].clamp(min=1.0), torch.zeros((), device=labels.device))
    return weights, int((counts > 0).sum())


@dataclass
class VisualLayout:
    """Where a batch's visual tokens are, per token (B, T), and the grid of each image — what token reduction needs.
    Non-visual tokens have image_index = grid_row = grid_col = -1; structural visual tokens (CLS, row separators)
    carry their image_index but are not patches."""

    patch_mask: torch.Tensor  # (B, T) bool: droppable grid patches
    image_index: torch.Tensor  # (B, T) long: the image (in order of `images`) each visual token comes from
    grid_row: torch.Tensor  # (B, T) long
    grid_col: torch.Tensor  # (B, T) long
    grids: list[tuple[int, int]]  # (rows, cols) per image


class EncoderFreeVLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config.decoder)
        self.embedder = build_embedder(config.vision, config.decoder.hidden_size, config.encoder)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def set_visual_position_step(self, step: float) -> None:
        """V2PE at inference: visual tokens advance the RoPE position by `step` in (0, 1] from now on, whatever the
        model was trained with (a model trained at several steps can be run at any of them). Refused where the
        config refuses it (native RoPE: an image's tokens share one position)."""
        dataclasses.replace(self.decoder.config, visual_position_step=step)  # validates: ConfigError if not allowed
        self.decoder.config.visual_position_step = step
        self.config.decoder.visual_position_step = step

    def set_token_pool(self, pool: int) -> None:
        """TokenFLEX at inference: lay out and embed every image with its token grid pooled by `pool` from now on (a
        processor built over this model's VisionConfig counts the placeholders alike)."""
        dataclasses.replace(self.config.vision, token_pool=pool)  # validates: ConfigError if not allowed
        self.config.vision.token_pool = pool

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.for_model(self.decoder, batch_size, max_length)

    def embed(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) + images [(3, H, W), ...] in order of appearance -> (inputs_embeds (B, T, C), vision_mask)."""
        embeds = self.decoder.embed_tokens(input_ids)  # (B, T, C)
        if not images:
            return embeds, None
        vision_mask = input_ids == self.image_token_id  # (B, T)
        visual = torch.cat(self.embedder(images, self.image_pools(vision_mask, images)), dim=0).to(embeds.dtype)
        num_placeholders = int(vision_mask.sum())
        if visual.shape[0] != num_placeholders:
            raise ValueError(
                f"the batch has {num_placeholders} image placeholder tokens but its {len(images)} image(s) give "
                f"{visual.shape[0]} visual tokens; build input_ids with the processor of this model"
            )
        embeds = embeds.masked_scatter(vision_mask.unsqueeze(-1), visual)
        return embeds, vision_mask

    def image_pools(self, vision_mask: torch.Tensor, images: list[torch.Tensor]) -> list[int]:
        """Each image's TokenFLEX pooling factor, read from its number of placeholders (the processor chose it): the
        config's token_pool when that count fits, else the smallest factor whose layout has that count. Images
        take the runs of placeholders of vision_mask (B, T) in row-major order (text tokens separate them)."""
        default = self.config.vision.token_pool
        flat = vision_mask.reshape(-1).nonzero().squeeze(1)  # (N_visual,) flat positions
        if flat.numel() == 0:
            return [default] * len(images)
        breaks = (flat[1:] != flat[:-1] + 1) | (flat[1:] % vision_mask.shape[1] == 0)  # a new run starts
        starts = torch.cat([flat.new_zeros(1), breaks.nonzero().squeeze(1) + 1])
        counts = torch.diff(torch.cat([starts, flat.new_tensor([flat.numel()])])).tolist()
        if len(counts) != len(images):
            return [default] * len(images)  # the count check of `embed` names the mismatch
        pools = []
        for image, count in zip(images, counts):
            if self.embedder.token_layout(image, default).num_tokens == count:
                pools.append(default)
                continue
            side = max(image.shape[-2:]) // self.config.vision.pixels_per_token
            fits = [p for p in range(1, side + 1) if self.embedder.token_layout(image, p).num_tokens == count]
            pools.append(fits[0] if fits else default)
        return pools

    def image_layouts(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None) -> list[TokenLayout]:
        """The `TokenLayout` of each image of input_ids (B, T), at the pooling its placeholders say (`image_pools`)."""
        if not images:
            return []
        pools = self.image_pools(input_ids == self.image_token_id, images)
        return [self.embedder.token_layout(image, pool) for image, pool in zip(images, pools)]

    def visual_layout(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None) -> VisualLayout:
        """The placeholders of input_ids (B, T) laid out as the embedder fills them (same scatter order as `embed`)."""
        vision_mask = input_ids == self.image_token_id  # (B, T)
        layouts = self.image_layouts(input_ids, images)
        device = input_ids.device

        def scatter(values: list[torch.Tensor], fill: bool | int) -> torch.Tensor:  # per image (N_i,) -> (B, T)
            out = torch.full(input_ids.shape, fill, device=device)
            return out.masked_scatter(vision_mask, torch.cat(values).to(device)) if values else out

        image_index = [torch.full_like(layout.grid_row, i) for i, layout in enumerate(layouts)]
        return VisualLayout(
            patch_mask=scatter([layout.is_patch for layout in layouts], False),
            image_index=scatter(image_index, -1),
            grid_row=scatter([layout.grid_row for layout in layouts], -1),
            grid_col=scatter([layout.grid_col for layout in layouts], -1),
            grids=[(layout.rows, layout.cols) for layout in layouts],
        )

    def hidden_states(self, input_ids: torch.Tensor, images: list[torch.Tensor] | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None, turn_ids: torch.Tensor | None = None,
                      num_blocks: int | None = None) -> torch.Tensor:
        """The decoder's final-norm hidden states (B, T, C) for input_ids (B, T) with images scattered in; `turn_ids`
        (B, T) for training rows of isolated turns (`Decoder.turn_inputs`); `num_blocks` (`Decoder.hidden_states`):
        the output of the first that many blocks instead."""
        embeds, vision_mask = self.embed(input_ids, images)
        grid = self.grid_positions(input_ids, images) if self.config.decoder.native_rope and images else None
        return self.decoder.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache, vision_mask=vision_mask,
                                          grid_positions=grid, turn_ids=turn_ids, num_blocks=num_blocks)

    def grid_positions(self, input_ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        """Native RoPE's (row, column) of each token (B, T, 2): a patch's place in its image's grid; 0 for text,
        CLS and row separators (NEO's images have neither)."""
        layout = self.visual_layout(input_ids, images)
        return torch.stack([layout.grid_row.clamp(min=0), layout.grid_col.clamp(min=0)], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        images: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        reduction=None,
        turn_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with last_only. Decode steps pass only input_ids (and the cache).

        `reduction` (`monovlm.infer.reduction.build_reduction(...)`) hands the forward to the token reduction, which
        runs the decoder's layers itself and drops or merges visual tokens between them; the logits then cover the
        kept tokens only (left-padded per row, the last column is still each row's last token). Its cache is a
        `reduction.new_cache(...)`, whose `decode` runs the later tokens."""
        if reduction is not None:
            if turn_ids is not None:
                raise ValueError("token reduction is an inference path; isolated turns are a training layout")
            return reduction.forward(self, input_ids, images, attention_mask, position_ids, cache, last_only)
        hidden = self.hidden_states(input_ids, images, attention_mask, position_ids, cache, turn_ids)
        if last_only:
            hidden = hidden[:, -1:]
        return F.linear(hidden, self.decoder.output_weight)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        images: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        reduction: str = "mean",
        turn_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy over labelled positions ("mean", or "sum" for the trainer, which divides by the
        number of labelled tokens of the whole global batch so that accumulation and data parallelism give the same
        loss as one big batch). labels (B, T) are aligned with input_ids (the shift happens here); the output head
        runs only where there is a label, which skips every image position."""
        hidden = self.hidden_states(input_ids, images, attention_mask, position_ids, turn_ids=turn_ids)  # (B, T, C)
        return labelled_cross_entropy(hidden, labels, self.decoder.output_weight, reduction)

    # -----------------------------------------------------------------------------------------------------------
    # saving and loading (a monovlm folder: config.json, model.safetensors, tokenizer files)

    def save(self, path: str | os.PathLike, tokenizer=None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, model.safetensors (fp32 or the model's dtype) and the tokenizer. `state_dict` replaces
        the module's own (e.g. a full state gathered from FSDP shards)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state_dict = state_dict if state_dict is not None else self.state_dict()
        tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(folder)
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "EncoderFreeVLM":
        """A saved model folder -> the model in `dtype` (float32 by default, whatever dtype its weights file stores),
        in eval mode as `transformers` loads models (a "cnn" stem's BatchNorm then uses its saved statistics)."""
        from monovlm.model.hf import CheckpointError, load_safetensors_strict, read_json

        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"model folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
        values = read_json(folder / CONFIG_FILE)
        if values.pop("model_type", None) != MODEL_TYPE:
            raise CheckpointError(f"{folder / CONFIG_FILE} is not a monovlm encoder-free VLM config (model_type)")
        model = cls(VLMConfig.from_dict(values))
        load_safetensors_strict(model, folder / WEIGHTS_FILE, device)
        return model.to(device=device, dtype=dtype).eval()
