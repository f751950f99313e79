"""A preallocated key/value cache for incremental decoding.

Each layer's keys and values live in one tensor allocated at the maximum length, on the layer's first write. Writing
a step is a slice copy; reading is a view. No per-step `torch.cat`, no reallocation: at small model sizes the decode
loop is bound by Python and allocator overhead, not by FLOPs.

All rows share one write position (`length`): left padding keeps prompts right-aligned, so every row appends at the
same index. The cache also remembers, per row, which slots are real tokens (`segment_ids != 0`), and the next RoPE
position of each row.
"""

from __future__ import annotations

import torch


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
        key_dim: int | None = None,
    ):
        self.num_layers = num_layers
        self.max_length = max_length
        self.shape = (batch_size, num_kv_heads, max_length, head_dim)  # of the values
        # keys can be wider than values: native RoPE's are [t | h | w], 2·head_dim
        self.key_shape = (batch_size, num_kv_heads, max_length, key_dim or head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # per layer (B, Hkv, max_length, D) once written
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # segment id of each cached slot: 0 = padding (never attended), >0 = the document the token belongs to
        self.segment_ids = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)  # (B, max_length)
        self.length = 0  # slots filled, the same for every row
        self.has_padding = False  # whether any filled slot is padding: if not, decode needs no mask
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next RoPE position

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> "KVCache":
        decoder = getattr(model, "decoder", model)  # a VLM caches its decoder's keys and values
        config = decoder.config
        weight = decoder.embed_tokens.weight
        head_dim = config.resolved_head_dim
        return cls(config.num_layers, batch_size, config.num_kv_heads, max_length, head_dim,
                   dtype=dtype or weight.dtype, device=weight.device,
                   key_dim=2 * head_dim if config.native_rope else head_dim)

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated key/value storage."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_length:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {num_new} new tokens exceeds max_length={self.max_length}"
            )

    def allocate(self, layer: int | None = None) -> None:
        """Give one layer (or, with None, every layer) its storage; a no-op where it has some."""
        for index in [layer] if layer is not None else range(self.num_layers):
            if self.keys[index] is None:
                self.keys[index] = torch.zeros(self.key_shape, dtype=self.dtype, device=self.device)
                self.values[index] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (B, Hkv, T, D) and return all its cached ones (B, Hkv, length+T, D)."""
        if self.keys[layer] is None:
            self.allocate(layer)
        start, end = self.length, self.length + keys.shape[2]
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        layer_keys[:, :, start:end] = keys
        layer_values[:, :, start:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

    def advance(self, position_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> None:
        """Commit the T new slots after every layer has written them. position_ids (B, T); segment_ids (B, T), or
        None when every new token is real and in one document (decode steps: no check, so no device sync)."""
        start, end = self.length, self.length + position_ids.shape[1]
        if segment_ids is None:
            self.segment_ids[:, start:end] = 1
        else:
            self.segment_ids[:, start:end] = segment_ids
            self.has_padding = self.has_padding or bool((segment_ids == 0).any())
        self.length = end
        self.next_position = position_ids[:, -1] + 1

    def reorder(self, row_index: torch.Tensor) -> None:
        """Keep only (or reorder) the rows given by row_index (B',) — e.g. to drop finished sequences."""
        self.keys = [k[row_index] if k is not None else None for k in self.keys]
        self.values = [v[row_index] if v is not None else None for v in self.values]
        self.segment_ids = self.segment_ids[row_index]
        self.next_position = self.next_position[row_index]
        self.shape = (len(row_index),) + self.shape[1:]
        self.key_shape = (len(row_index),) + self.key_shape[1:]
