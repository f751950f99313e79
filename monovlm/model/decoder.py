"""A Llama-family decoder: token embedding, RMSNorm, RoPE, grouped-query attention through SDPA, SwiGLU MLP.

Config switches cover the checkpoints we load: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window
(Mistral), tied or untied output head. The forward pass takes token ids or `inputs_embeds` (the VLM scatters image
embeddings into those), explicit `position_ids`, and a segment-id attention mask (see `masks.py`) that expresses left
padding and packed documents. An optional `KVCache` makes decoding incremental. At prefill, a bound token reduction
(`reducer`, see `monovlm.infer.reduction`) may drop visual tokens before chosen layers; the cache then holds fewer
tokens from those layers on, and decode steps go through it group by group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monovlm.config import DecoderConfig
from monovlm.model.experts import Routing, route
from monovlm.model.kv_cache import KVCache, LayerGroup
from monovlm.model.masks import build_attention_mask, open_images, position_ids_from_segments
from monovlm.model.rope import RotaryTable, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op (decode is op-bound)
        # lower precision: normalise in fp32 (bf16 squares lose too much), then scale in the input dtype — HF's order
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Projections(nn.Module):
    """q, k and v from one fused matmul (one weight read, one op instead of three), and the output projection.

    The fused weight stacks HF's q_proj, k_proj, v_proj rows in that order; `hf.py` splits and joins them."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        fused_heads = self.num_heads + 2 * self.num_kv_heads
        self.qkv_proj = nn.Linear(config.hidden_size, fused_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> q, k, v heads (..., H + 2·Hkv, D); q and k normed per head where the model has q/k norms."""
        qkv = self.qkv_proj(x).unflatten(-1, (self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        if self.q_norm is None:
            return qkv
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-2)

    def project_flat(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x).flatten(-2)  # (N, (H + 2·Hkv)·D), the 2-D form that routing gathers and scatters


class Attention(Projections):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__(config)
        self.layer_index = layer_index
        # the vision expert: its own projections (and q/k norms); attention over all tokens stays shared
        self.vision = Projections(config) if config.expert_attention else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: LayerGroup | None,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if routing is None or self.vision is None:
            qkv = self.project(x)  # (B, T, H + 2·Hkv, D)
        else:
            qkv = route(x, routing, self.project_flat, self.vision.project_flat).unflatten(-1, (-1, self.head_dim))
        qkv = qkv.transpose(1, 2)  # (B, H + 2·Hkv, T, D)
        qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)  # q and k rotated together: (B, H + Hkv, T, D)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, heads + kv_heads :]  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.write(self.layer_index, k, v)  # (B, Hkv, S, D) with S = cached + T in this layer
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=kv_heads != heads
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, heads * self.head_dim)
        return route(out, routing, self.o_proj, self.vision.o_proj if self.vision is not None else None)


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        # vision experts of the norms and the MLP (the attention's live inside Attention)
        self.vision_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if config.expert_norms else None
        self.vision_mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if config.expert_norms else None
        self.vision_mlp = MLP(config) if config.expert_mlp else None

    def forward(self, x, cos, sin, attn_mask, is_causal, cache, routing: Routing | None = None):
        if routing is None:  # text only: the plain path, no gathers
            x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache)
            return x + self.mlp(self.mlp_norm(x))
        normed = route(x, routing, self.attn_norm, self.vision_attn_norm)
        x = x + self.attn(normed, cos, sin, attn_mask, is_causal, cache, routing)
        if self.vision_mlp_norm is not None and self.vision_mlp is not None:
            # both parts routed: one gather/scatter for norm + MLP together
            mlp_out = route(x, routing, lambda h: self.mlp(self.mlp_norm(h)),
                            lambda h: self.vision_mlp(self.vision_mlp_norm(h)))
        else:
            normed = route(x, routing, self.mlp_norm, self.vision_mlp_norm)
            mlp_out = route(normed, routing, self.mlp, self.vision_mlp)
        return x + mlp_out


def _grown_embedding(embedding: nn.Embedding, new_rows: int) -> nn.Embedding:
    old = embedding.weight
    grown = nn.Embedding(new_rows, old.shape[1], device=old.device, dtype=old.dtype)
    grown.weight[: old.shape[0]] = old
    grown.weight[old.shape[0] :] = old.mean(dim=0, keepdim=True)
    return grown


class Decoder(nn.Module):
    """The language model. `forward` returns logits (B, T, V), or only the last position's with `last_only=True`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryTable(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size: int) -> None:
        """Grow the embedding (and an untied head) to new_vocab_size rows for added special tokens.

        New rows start at the mean of the existing rows: a new token then looks like an "average" token to every
        layer, so the model's outputs on old text are unchanged and the new rows start near the data, not at noise
        (the choice HF and nanoVLM-style recipes make too). Shrinking is refused: it would silently cut token ids.
        """
        old_vocab_size = self.config.vocab_size
        if new_vocab_size < old_vocab_size:
            raise ValueError(f"cannot shrink the vocabulary from {old_vocab_size} to {new_vocab_size} rows")
        if new_vocab_size == old_vocab_size:
            return
        self.embed_tokens = _grown_embedding(self.embed_tokens, new_vocab_size)
        if self.lm_head is not None:
            old_head = self.lm_head.weight
            head = nn.Linear(old_head.shape[1], new_vocab_size, bias=False, device=old_head.device, dtype=old_head.dtype)
            head.weight[:old_vocab_size] = old_head
            head.weight[old_vocab_size:] = old_head.mean(dim=0, keepdim=True)
            self.lm_head = head
        self.config.vocab_size = new_vocab_size

    @torch.no_grad()
    def init_experts_from_text(self) -> None:
        """Copy every language weight into its vision expert (EVEv2 initialises its experts this way), so a freshly
        expert-ised model computes exactly what the original did until training moves the experts apart."""
        for block in self.layers:
            pairs = [(block.attn_norm, block.vision_attn_norm), (block.mlp_norm, block.vision_mlp_norm),
                     (block.mlp, block.vision_mlp)]
            attn = block.attn
            if attn.vision is not None:
                pairs += [(getattr(attn, name), getattr(attn.vision, name))
                          for name in ("qkv_proj", "o_proj", "q_norm", "k_norm")]
            for text_part, vision_part in pairs:
                if text_part is not None and vision_part is not None:
                    vision_part.load_state_dict(text_part.state_dict())

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, T) segment ids (0 = padding; 1/0 padding
        masks are one segment per row) or a ready boolean mask (B, 1, T, S); position_ids (B, T); vision_mask (B, T)
        True at visual tokens, which then take the vision experts (when the config has any) and, with
        image_attention = "bidirectional", see the later tokens of their own image."""
        hidden = self.hidden_states(input_ids, inputs_embeds, attention_mask, position_ids, cache, vision_mask)
        if last_only:
            hidden = hidden[:, -1:]
        return F.linear(hidden, self.output_weight)  # (B, T, V)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        vision_mask: torch.Tensor | None = None,
        reducer=None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, C) before the output head.

        `reducer` (a bound token reduction from `monovlm.infer.reduction`, prefill only) may drop or merge visual
        tokens before chosen layers; the output then covers the kept tokens only, left-padded per row."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if reducer is not None:
            return self._reduced_hidden_states(x, attention_mask, position_ids, cache, vision_mask, reducer)
        batch, length = x.shape[:2]
        store = None
        if cache is not None:
            cache.check_room(length)
            cache.allocate()
            store = cache.groups[0]
        attn_mask, is_causal, segment_ids = self._attention_mask(attention_mask, batch, length, store, x.device,
                                                                 vision_mask)
        if position_ids is None:
            start = cache.next_position if cache is not None and cache.length > 0 else None
            position_ids = self._default_positions(segment_ids, batch, length, start, x.device)
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, 1, T, D)
        routing = Routing.from_mask(vision_mask) if self.config.has_experts else None
        if cache is None or not cache.reduced:
            for block in self.layers:
                x = block(x, cos, sin, attn_mask, is_causal, store, routing)
        else:  # a cache reduced at prefill: each layer group has its own cached slots (and maybe positions)
            x = self._run_split_cache(x, cache, attention_mask, position_ids, cos, sin, routing)
        if cache is not None:
            if segment_ids is None:
                segment_ids = torch.ones(batch, length, dtype=torch.long, device=x.device)
            cache.advance(segment_ids, position_ids)
        return self.norm(x)

    @staticmethod
    def _default_positions(segment_ids, batch, length, start, device):
        if segment_ids is None:
            base = torch.arange(length, device=device)[None].expand(batch, length)
            return base if start is None else base + start[:, None]
        return position_ids_from_segments(segment_ids, start)

    def _run_split_cache(self, x, cache, attention_mask, position_ids, cos, sin, routing):
        """New tokens through a cache whose layer groups hold different slots: one mask per group, and positions
        shifted where the reduction renumbered them."""
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("a KV cache reduced at prefill needs segment-id attention masks (B, T), not 4-D masks")
        batch, length = x.shape[:2]
        for group in cache.groups:
            attn_mask, is_causal, _ = self._attention_mask(attention_mask, batch, length, group, x.device)
            group_cos, group_sin = cos, sin
            if group.position_shift is not None:
                group_cos, group_sin = self.rotary(position_ids - group.position_shift[:, None], x.dtype)
            for index in group.layers:
                x = self.layers[index](x, group_cos, group_sin, attn_mask, is_causal, group, routing)
        return x

    def _reduced_hidden_states(self, x, attention_mask, position_ids, cache, vision_mask, reducer):
        """Prefill with token reduction. Before each layer in `reducer.layers`, the reducer may return fewer tokens
        (hidden states, positions, segment ids, vision mask, and a position shift under renumbering); masks, RoPE
        and expert routing are rebuilt from them, and the cache gives the layers from there on their own, smaller,
        group. Layers before keep the full prompt in the cache, so decoding equals a full forward with the same
        reduction. A reduction that keeps every token changes nothing: the arithmetic is that of the plain path."""
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("token reduction needs a segment-id attention mask (B, T), not a ready 4-D mask")
        if self.config.sliding_window is not None:
            raise ValueError("token reduction is not supported with a sliding-window model: the window counts cache "
                             "slots, which no longer match positions once tokens are dropped")
        batch, length = x.shape[:2]
        store = None
        if cache is not None:
            if cache.length > 0:
                raise ValueError("token reduction happens at prefill: pass an empty KV cache (this one holds "
                                 f"{cache.length} tokens)")
            cache.check_room(length)
            store = cache.groups[0]
        attn_mask, is_causal, segment_ids = self._attention_mask(attention_mask, batch, length, store, x.device,
                                                                 vision_mask)
        if segment_ids is None:
            segment_ids = torch.ones(batch, length, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = position_ids_from_segments(segment_ids)
        next_position = position_ids[:, -1] + 1  # layers before a reduction saw the whole prompt
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, 1, T, D)
        routing = Routing.from_mask(vision_mask) if self.config.has_experts else None
        reducer.start(position_ids, segment_ids, vision_mask)
        group_segments = {store: segment_ids} if store is not None else {}
        for index, block in enumerate(self.layers):
            if index in reducer.layers:
                kept = reducer.reduce(index, x, self)
                if kept is not None:
                    x, position_ids, segment_ids = kept.hidden, kept.position_ids, kept.segment_ids
                    if cache is not None:
                        store = cache.split(index, x.shape[1], cache.max_length - length, kept.position_shift)
                        group_segments[store] = segment_ids
                    attn_mask, is_causal, _ = self._attention_mask(segment_ids, batch, x.shape[1], store, x.device,
                                                                   kept.vision_mask)
                    cos, sin = self.rotary(position_ids, x.dtype)
                    routing = Routing.from_mask(kept.vision_mask) if self.config.has_experts else None
            if store is not None:
                store.allocate(index)
            x = block(x, cos, sin, attn_mask, is_causal, store, routing)
        if cache is not None:
            for group in cache.groups:
                group.commit(group_segments[group])
            cache.next_position = next_position
        return self.norm(x)

    def _attention_mask(self, attention_mask, batch, length, store, device, vision_mask=None):
        """Pick the cheapest correct SDPA arguments: (attn_mask, is_causal, segment_ids or None). `store` is the KV
        cache's layer group the new tokens attend through (its cached slots, their segments), or None.
        `vision_mask` (B, T) matters only with image_attention = "bidirectional" (then the mask is explicit)."""
        past = store.length if store is not None else 0
        window = self.config.sliding_window
        window_matters = window is not None and past + length > window
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.to(torch.bool), False, None
        segment_ids = None
        trivial = True  # every token real and in one document per row
        if attention_mask is not None:
            segment_ids = attention_mask.long()
            trivial = not bool((segment_ids != 1).any())
            if store is not None and bool((segment_ids == 0).any()):
                store.has_padding = True
        has_padding = store.has_padding if store is not None else False
        within_images = (self.config.image_attention == "bidirectional" and vision_mask is not None
                         and bool(vision_mask.any()))
        if trivial and not has_padding and not window_matters and not within_images:
            if past == 0:
                return None, length > 1, segment_ids
            if length == 1:
                return None, False, segment_ids  # one new query may see every cached key
        if segment_ids is None:
            segment_ids = torch.ones(batch, length, dtype=torch.long, device=device)
        if store is not None and past > 0:
            key_segments = torch.cat([store.segment_ids[:, :past], segment_ids], dim=1)
        else:
            key_segments = segment_ids
        mask = build_attention_mask(segment_ids, key_segments, past, window if window_matters else None)
        if within_images:
            mask = open_images(mask, vision_mask, past)
        return mask, False, segment_ids
