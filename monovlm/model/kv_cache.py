"""A preallocated key/value cache for incremental decoding.

One tensor holds every layer's keys (and one its values), allocated once at the maximum length. Writing a step is a
slice copy; reading is a view. No per-step `torch.cat`, no reallocation: at small model sizes the decode loop is
bound by Python and allocator overhead, not by FLOPs.

All rows of a batch share one write position (`length`): left padding keeps prompts right-aligned, so every row
appends at the same index. The cache also remembers, per row, which cached slots are real tokens (`segment_ids != 0`)
and the next RoPE position of each row.
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
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, D)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, D)
        # segment id of each cached slot: 0 = padding (never attended), >0 = the document the token belongs to
        self.segment_ids = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)  # (B, S)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0  # slots filled, the same for every row
        self.has_padding = False  # whether any filled slot is padding: if not, decode needs no mask
        self.max_length = max_length

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
        return self.keys.shape[1]

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_length:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {num_new} new tokens exceeds max_length={self.max_length}"
            )

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, Hkv, T, D) and return all cached ones (B, Hkv, length+T, D)."""
        start, end = self.length, self.length + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Commit the T new slots after every layer has written them. segment_ids, position_ids: (B, T)."""
        num_new = segment_ids.shape[1]
        self.segment_ids[:, self.length : self.length + num_new] = segment_ids
        self.next_position = position_ids[:, -1] + 1
        self.length += num_new

    def reorder(self, row_index: torch.Tensor) -> None:
        """Keep only (or reorder) the rows given by row_index (B',) — e.g. to drop finished sequences."""
        self.keys = self.keys[:, row_index]
        self.values = self.values[:, row_index]
        self.segment_ids = self.segment_ids[row_index]
        self.next_position = self.next_position[row_index]
