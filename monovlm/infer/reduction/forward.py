"""Token reduction's forward: the decoder's own layers, walked one by one, with visual tokens dropped or merged before
chosen layers, and a KV cache of their own for the layers from each reduction on.

The decoder has one forward; this is the other walk over its layers, built from the same pieces (`Decoder.embed`,
`Decoder.layer_inputs`, the blocks, `Decoder.norm`). Before each hook layer of the method, the `Reducer` (`apply.py`)
may return fewer tokens; masks, RoPE and expert routing are rebuilt from them, and the layers from there on cache only
the kept tokens, in a `KVCache` of their own (a `CacheGroup` of the `ReducedCache`). Layers before keep the full
prompt, and every group grows by the same decoded tokens, so cached decoding equals a full forward with the same
reduction. A reduction that keeps every token changes nothing: the arithmetic is that of the plain forward.

    reduction = build_reduction("fastv", keep=0.5)
    logits = vlm(input_ids, images, reduction=reduction)                        # one forward
    cache = reduction.new_cache(vlm, batch_size, max_length)
    logits = vlm(input_ids, images, cache=cache, last_only=True, reduction=reduction)   # the prompt
    logits = cache.decode(next_ids, last_only=True)                             # every later token
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from monovlm.infer.reduction.apply import Reducer, Trace
from monovlm.infer.reduction.base import Method
from monovlm.model.decoder import Decoder, segments_of
from monovlm.model.kv_cache import KVCache

POSITION_POLICIES = ("original", "renumber")


@dataclass
class CacheGroup:
    """Layers that cache the same tokens, their KV cache, and how far their positions lag the full sequence."""

    first_layer: int
    cache: KVCache
    position_shift: torch.Tensor | None = None  # (B,) renumbered: new tokens sit at their position minus this
    layers: range = range(0)  # set when the next group opens (or the prefill ends)


class ReducedCache:
    """The KV cache of a prompt whose prefill reduced visual tokens: one `KVCache` per group of layers that cache the
    same tokens. `decode` runs later tokens through every group."""

    def __init__(self, decoder: Decoder, batch_size: int, max_length: int, dtype: torch.dtype | None = None):
        self.decoder = decoder
        self.batch_size, self.max_length = batch_size, max_length
        self.dtype = dtype or decoder.embed_tokens.weight.dtype
        self.groups: list[CacheGroup] = []
        self.length = 0  # tokens seen: the full sequence, before any reduction
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=decoder.embed_tokens.weight.device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> ReducedCache:
        return cls(getattr(model, "decoder", model), batch_size, max_length, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of allocated key/value storage over all groups."""
        return sum(group.cache.nbytes for group in self.groups)

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_length:
            raise ValueError(f"KV cache is full: {self.length} cached + {num_new} new tokens exceeds "
                             f"max_length={self.max_length}")

    def open_group(self, first_layer: int, capacity: int, position_shift: torch.Tensor | None) -> CacheGroup:
        """Layers from first_layer on cache up to `capacity` tokens in a KV cache of their own."""
        cache = KVCache.for_model(self.decoder, self.batch_size, capacity, self.dtype)
        group = CacheGroup(first_layer, cache, position_shift)
        self.groups.append(group)
        return group

    def close_group(self, group: CacheGroup, end_layer: int, position_ids: torch.Tensor,
                    segment_ids: torch.Tensor) -> None:
        """The group's layers are [first_layer, end_layer) and have written the (B, T') prompt tokens it keeps."""
        group.layers = range(group.first_layer, end_layer)
        if not group.layers:  # a reduction before the group's first layer: it holds nothing
            self.groups.remove(group)
            return
        group.cache.advance(position_ids, segment_ids)

    def reorder(self, row_index: torch.Tensor) -> None:
        """Keep only (or reorder) the rows given by row_index (B',)."""
        for group in self.groups:
            group.cache.reorder(row_index)
            if group.position_shift is not None:
                group.position_shift = group.position_shift[row_index]
        self.next_position = self.next_position[row_index]
        self.batch_size = len(row_index)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) (or (B, 1, V) with last_only) of T new tokens (B, T) after the cached ones: each group's
        layers attend through their own cache, at positions shifted where the reduction renumbered them."""
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("a KV cache reduced at prefill needs segment-id attention masks (B, T), not 4-D masks")
        decoder = self.decoder
        x = decoder.embed(input_ids)  # (B, T, C)
        self.check_room(x.shape[1])
        segment_ids = segments_of(attention_mask)
        if position_ids is None:
            position_ids = decoder.default_positions(segment_ids, x.shape[:2], self.next_position, x.device)
        for group in self.groups:
            positions = position_ids if group.position_shift is None else position_ids - group.position_shift[:, None]
            inputs = decoder.layer_inputs(x, attention_mask, positions, group.cache)
            for index in group.layers:
                x = decoder.layers[index](x, inputs, group.cache)
            group.cache.advance(positions, segment_ids)
        self.length += x.shape[1]
        self.next_position = position_ids[:, -1] + 1
        hidden = decoder.norm(x)
        if last_only:
            hidden = hidden[:, -1:]
        return F.linear(hidden, decoder.output_weight)


def reduced_hidden_states(decoder: Decoder, x: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None, cache: ReducedCache | None,
                          vision_mask: torch.Tensor | None, reducer: Reducer,
                          grid_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill with token reduction: x (B, T, C) embeddings -> final-norm hidden states (B, T', C) of the kept
    tokens, left-padded per row. A cache passed along (empty) gets one group per stretch of layers. With native
    RoPE, grid_positions (B, T, 2) are the tokens' grid rows and columns; kept tokens keep theirs."""
    if attention_mask is not None and attention_mask.dim() == 4:
        raise ValueError("token reduction needs a segment-id attention mask (B, T), not a ready 4-D mask")
    if decoder.config.sliding_window is not None:
        raise ValueError("token reduction is not supported with a sliding-window model: the window counts cache "
                         "slots, which no longer match positions once tokens are dropped")
    batch, length = x.shape[:2]
    segment_ids = segments_of(attention_mask)
    if segment_ids is None:
        segment_ids = torch.ones(batch, length, dtype=torch.long, device=x.device)
    if position_ids is None:
        position_ids = decoder.default_positions(segment_ids, x.shape[:2], None, x.device, vision_mask)
    if reducer.reduction.positions == "renumber" and decoder.config.visual_position_step != 1:
        raise ValueError("positions='renumber' counts the kept tokens one by one, which undoes the model's "
                         f"visual_position_step={decoder.config.visual_position_step}; use positions='original'")
    if reducer.reduction.positions == "renumber" and decoder.config.native_rope:
        raise ValueError("positions='renumber' counts the kept tokens one by one, which undoes native RoPE's one "
                         "position per image; use positions='original'")
    group = None
    if cache is not None:
        if cache.length > 0 or cache.groups:
            raise ValueError(f"token reduction happens at prefill: pass an empty KV cache (this one holds "
                             f"{cache.length} tokens); later tokens go through `cache.decode`")
        cache.check_room(length)
        group = cache.open_group(0, cache.max_length, None)
    full_next_position = position_ids[:, -1] + 1  # layers before a reduction saw the whole prompt
    inputs = decoder.layer_inputs(x, segment_ids, position_ids, _cache_of(group), vision_mask, grid_positions)
    reducer.start(position_ids, segment_ids, vision_mask)
    for index, block in enumerate(decoder.layers):
        if index in reducer.layers:
            kept = reducer.reduce(index, x, decoder)
            if kept is not None:
                if cache is not None:
                    cache.close_group(group, index, position_ids, segment_ids)
                    room = cache.max_length - length  # every group keeps the same room for later tokens
                    group = cache.open_group(index, kept.hidden.shape[1] + room, kept.position_shift)
                x, position_ids, segment_ids = kept.hidden, kept.position_ids, kept.segment_ids
                inputs = decoder.layer_inputs(x, segment_ids, position_ids, _cache_of(group), kept.vision_mask,
                                              kept.grid_positions)
        x = block(x, inputs, _cache_of(group))
    if cache is not None:
        cache.close_group(group, len(decoder.layers), position_ids, segment_ids)
        cache.length = length
        cache.next_position = full_next_position
    return decoder.norm(x)


def _cache_of(group: CacheGroup | None) -> KVCache | None:
    return group.cache if group is not None else None


@dataclass
class Reduction:
    """A configured token reduction: the method (with its keep ratio and layers) and the position policy.

    `positions="original"` (default) keeps each token's RoPE position, gaps and all (FastV, DivPrune); "renumber"
    makes the kept tokens contiguous again (PyramidDrop), and decode steps then continue from the renumbered end
    in the layers after the reduction. Pass it as `reduction=` to the VLM's forward, or in `prefill_inputs` to
    `generate`. After each forward, `last_trace` holds that forward's decisions (inspection, replay, accounting)."""

    method: Method
    positions: str = "original"
    last_trace: Trace | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITION_POLICIES}")

    @property
    def name(self) -> str:
        return self.method.name

    def new_cache(self, model, batch_size: int, max_length: int) -> ReducedCache:
        """An empty cache for a reduced prefill of batch_size rows and up to max_length tokens in all."""
        return ReducedCache.for_model(model, batch_size, max_length)

    def bind(self, layout, num_layers: int) -> Reducer:
        """The per-forward reducer (see `apply.Reducer`); records its trace in `last_trace`."""
        reducer = Reducer(self, layout, num_layers)
        self.last_trace = reducer.trace
        return reducer

    def forward(self, vlm, input_ids: torch.Tensor, images: list[torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: ReducedCache | None = None, last_only: bool = False) -> torch.Tensor:
        """The VLM's forward with this reduction: logits (B, T', V) of the kept tokens (or (B, 1, V) with
        last_only: each row's last token)."""
        if cache is not None and not isinstance(cache, ReducedCache):
            raise ValueError("token reduction keeps a KV cache per group of layers: pass "
                             "`reduction.new_cache(model, batch_size, max_length)`, not a plain KVCache")
        embeds, vision_mask = vlm.embed(input_ids, images)
        layout = vlm.visual_layout(input_ids, images)
        reducer = self.bind(layout, vlm.decoder.config.num_layers)
        grid = None
        if vlm.decoder.config.native_rope:  # each token's grid row and column (0 for text and structural tokens)
            grid = torch.stack([layout.grid_row, layout.grid_col], dim=-1).clamp(min=0)
        hidden = reduced_hidden_states(vlm.decoder, embeds, attention_mask, position_ids, cache, vision_mask,
                                       reducer, grid)
        if last_only:
            hidden = hidden[:, -1:]
        return F.linear(hidden, vlm.decoder.output_weight)
