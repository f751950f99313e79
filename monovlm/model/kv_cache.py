"""A preallocated key/value cache for incremental decoding.

Each layer's keys and values live in one tensor allocated at the maximum length. Writing a step is a slice copy;
reading is a view. No per-step `torch.cat`, no reallocation: at small model sizes the decode loop is bound by Python
and allocator overhead, not by FLOPs. Storage is allocated on the first forward, not at construction, so a prefill
that reduces visual tokens can size the layers after the reduction by the tokens it kept.

Layers are organised in `LayerGroup`s: contiguous layers that cache the same slots. All rows of a group share one
write position (`length`): left padding keeps prompts right-aligned, so every row appends at the same index. A group
also remembers, per row, which cached slots are real tokens (`segment_ids != 0`). A plain cache has one group over
every layer. Token reduction (`monovlm.infer.reduction`) splits it at the layers where tokens were dropped: the
layers before keep the full prompt, the layers after keep the reduced one, and every group then grows by the same
decoded tokens — which makes cached decoding equal a full forward with the same reduction.
"""

from __future__ import annotations

import torch


class LayerGroup:
    """Keys and values of layers [first_layer, first_layer + num_layers), which all cache the same `capacity` slots."""

    def __init__(self, first_layer: int, num_layers: int, batch_size: int, num_kv_heads: int, capacity: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.capacity = capacity
        self.shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # per layer (B, Hkv, capacity, D) once allocated
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # segment id of each cached slot: 0 = padding (never attended), >0 = the document the token belongs to
        self.segment_ids = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)  # (B, capacity)
        self.length = 0  # slots filled, the same for every row
        self.has_padding = False  # whether any filled slot is padding: if not, decode needs no mask
        # Renumbered positions (token reduction's "renumber" policy): these layers see every new token at its
        # position minus this shift (B,). None = the positions every layer sees.
        self.position_shift: torch.Tensor | None = None

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    def allocate(self, layer: int | None = None) -> None:
        """Allocate storage for one layer of the group (or, with None, every layer still without)."""
        for index in [layer - self.first_layer] if layer is not None else range(self.num_layers):
            if self.keys[index] is None:
                self.keys[index] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                self.values[index] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, Hkv, T, D) and return all cached ones (B, Hkv, length+T, D)."""
        index = layer - self.first_layer
        start, end = self.length, self.length + keys.shape[2]
        layer_keys, layer_values = self.keys[index], self.values[index]
        layer_keys[:, :, start:end] = keys
        layer_values[:, :, start:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

    def commit(self, segment_ids: torch.Tensor) -> None:
        """Record the T new slots (segment_ids (B, T)) after every layer of the group has written them."""
        num_new = segment_ids.shape[1]
        self.segment_ids[:, self.length : self.length + num_new] = segment_ids
        self.length += num_new

    def truncate_layers(self, num_layers: int) -> None:
        """Keep only the first num_layers layers (the rest move to a new group); they must hold no data yet."""
        if any(k is not None for k in self.keys[num_layers:]):
            raise ValueError("cannot move layers that already hold keys/values to a new group")
        self.num_layers = num_layers
        self.keys, self.values = self.keys[:num_layers], self.values[:num_layers]

    def reorder(self, row_index: torch.Tensor) -> None:
        self.keys = [k[row_index] if k is not None else None for k in self.keys]
        self.values = [v[row_index] if v is not None else None for v in self.values]
        self.segment_ids = self.segment_ids[row_index]
        if self.position_shift is not None:
            self.position_shift = self.position_shift[row_index]
        self.shape = (len(row_index),) + self.shape[1:]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated key/value storage."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.num_layers = num_layers
        self.max_length = max_length
        self._storage = (num_kv_heads, head_dim, dtype, device)  # what every group's tensors share
        self.groups = [LayerGroup(0, num_layers, batch_size, num_kv_heads, max_length, head_dim, dtype, device)]
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next RoPE position
        self._allocated = False
        self.reduced = False  # split by a token reduction: decode then runs group by group (masks, positions)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> "KVCache":
        decoder = getattr(model, "decoder", model)  # a VLM caches its decoder's keys and values
        config = decoder.config
        weight = decoder.embed_tokens.weight
        return cls(
            config.num_layers,
            batch_size,
            config.num_kv_heads,
            max_length,
            config.resolved_head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def length(self) -> int:
        """Tokens the cache has seen (the first group's slots: the full sequence, before any reduction)."""
        return self.groups[0].length

    @property
    def segment_ids(self) -> torch.Tensor:
        return self.groups[0].segment_ids

    @property
    def nbytes(self) -> int:
        """Bytes of allocated key/value storage over all layers."""
        return sum(group.nbytes for group in self.groups)

    def check_room(self, num_new: int) -> None:
        group = self.groups[0]  # every group leaves the same room for new tokens
        if group.length + num_new > group.capacity:
            raise ValueError(
                f"KV cache is full: {group.length} cached + {num_new} new tokens exceeds max_length={group.capacity}"
            )

    def allocate(self) -> None:
        """Give every layer its storage (a no-op once done); the plain forward calls this before writing."""
        if not self._allocated:
            for group in self.groups:
                group.allocate()
            self._allocated = True

    def group_of(self, layer: int) -> LayerGroup:
        for group in self.groups:
            if layer in group.layers:
                return group
        raise IndexError(f"layer {layer} is outside the cache's {self.num_layers} layers")

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (B, Hkv, T, D) in its group; returns all of that layer's cached ones."""
        return self.group_of(layer).write(layer, keys, values)

    def advance(self, segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Commit the T new slots after every layer has written them. segment_ids, position_ids: (B, T)."""
        for group in self.groups:
            group.commit(segment_ids)
        self.next_position = position_ids[:, -1] + 1

    def split(self, first_layer: int, num_tokens: int, room: int,
              position_shift: torch.Tensor | None = None) -> LayerGroup:
        """Move layers >= first_layer (none of which may hold data yet) to a new group of num_tokens + room slots:
        token reduction calls this at prefill, where layer first_layer onward caches only the kept tokens.
        position_shift (B,): those layers see new tokens at their position minus this (renumbered positions)."""
        last = self.groups[-1]
        end = last.first_layer + last.num_layers
        if not last.first_layer <= first_layer < end:
            raise ValueError(f"cannot split the cache at layer {first_layer}: layers split in increasing order, "
                             f"inside the last group (layers {last.first_layer}..{end - 1})")
        num_kv_heads, head_dim, dtype, device = self._storage
        group = LayerGroup(first_layer, end - first_layer, self.batch_size, num_kv_heads, num_tokens + room, head_dim,
                           dtype, device)
        group.position_shift = position_shift
        last.truncate_layers(first_layer - last.first_layer)
        if last.num_layers == 0:  # a reduction before layer 0: the new group replaces the empty one
            self.groups.pop()
        self.groups.append(group)
        self._allocated = False  # the new group allocates layer by layer (or on the next `allocate`)
        self.reduced = True
        return group

    def reorder(self, row_index: torch.Tensor) -> None:
        """Keep only (or reorder) the rows given by row_index (B',) — e.g. to drop finished sequences."""
        for group in self.groups:
            group.reorder(row_index)
        self.next_position = self.next_position[row_index]
