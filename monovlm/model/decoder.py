"""A Llama-family decoder: token embedding, RMSNorm, RoPE, grouped-query attention through SDPA, SwiGLU MLP.

Config switches cover the checkpoints we load: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window
(Mistral), tied or untied output head. The forward pass takes token ids or `inputs_embeds` (the VLM scatters image
embeddings into those), explicit `position_ids`, and a segment-id attention mask (see `masks.py`) that expresses left
padding and packed documents. An optional `KVCache` makes decoding incremental.

There is one forward: embed, `layer_inputs` (RoPE tables, the SDPA mask arguments, expert routing — computed once and
shared by every layer), the blocks, the final norm. Inference tricks that change the tokens between layers (token
reduction, `monovlm.infer.reduction`) or run the step differently (`monovlm.infer.compiled`) iterate these same
pieces, and read attention through `Attention.project_qkv` and `Attention.probabilities`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from monovlm.config import DecoderConfig
from monovlm.model.experts import Routing, route
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import (build_attention_mask, isolate_turns, open_images, position_ids_from_segments,
                                 turn_positions)
from monovlm.model.rope import RotaryTable, apply_rotary


@dataclass
class LayerInputs:
    """What every layer of one forward shares, computed once: RoPE tables, SDPA's mask arguments, expert routing."""

    cos: torch.Tensor  # (B, 1, T, D)
    sin: torch.Tensor  # (B, 1, T, D)
    attn_mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None with is_causal (or no mask at all)
    is_causal: bool
    routing: Routing | None  # visual tokens to the vision experts; None = every token takes the text path
    hw: tuple[torch.Tensor, ...] | None = None  # native RoPE: cos/sin at each token's grid row, then column (B, 1, T, D/2)


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


class GridProjections(nn.Module):
    """Native RoPE's extra q and k (NEO's q_proj_hw / k_proj_hw): each head's first half normed and rotated by the
    token's grid row, its second half by its grid column."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        half = self.head_dim // 2
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.q_norm_h, self.q_norm_w, self.k_norm_h, self.k_norm_w = (RMSNorm(half, config.rms_norm_eps)
                                                                      for _ in range(4))

    def forward(self, x: torch.Tensor, hw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k (B, Hkv, T, D); hw: cos_h, sin_h, cos_w, sin_w, each (B, 1, T, D/2)."""
        cos_h, sin_h, cos_w, sin_w = hw
        half = self.head_dim // 2
        parts = []
        for proj, heads, norm_h, norm_w in ((self.q_proj, self.num_heads, self.q_norm_h, self.q_norm_w),
                                            (self.k_proj, self.num_kv_heads, self.k_norm_h, self.k_norm_w)):
            y = proj(x).unflatten(-1, (heads, self.head_dim)).transpose(1, 2)  # (B, heads, T, D)
            h, w = norm_h(y[..., :half]), norm_w(y[..., half:])
            parts.append(torch.cat([apply_rotary(h, cos_h, sin_h), apply_rotary(w, cos_w, sin_w)], dim=-1))
        return parts[0], parts[1]


class Attention(Projections):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__(config)
        self.layer_index = layer_index
        # the vision expert: its own projections (and q/k norms); attention over all tokens stays shared
        self.vision = Projections(config) if config.expert_attention else None
        # NEO's native RoPE: q/k for the grid row and column
        self.hw = GridProjections(config) if config.native_rope else None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                    routing: Routing | None = None, hw: tuple[torch.Tensor, ...] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k (B, Hkv, T, D), v (B, Hkv, T, D): the fused projection (the vision
        expert's at routed visual tokens), per-head q/k norms, and RoPE on q and k when cos/sin (B, 1, T, D) are
        given (without them k is the pre-RoPE key some token-merging metrics compare). With native RoPE and cos/sin
        given, q and k are 2·D wide: [t | h | w], the h/w part at the grid positions `hw` (text: row 0, column 0)."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if routing is None or self.vision is None:
            qkv = self.project(x)  # (B, T, H + 2·Hkv, D)
        else:
            qkv = route(x, routing, self.project_flat, self.vision.project_flat).unflatten(-1, (-1, self.head_dim))
        qkv = qkv.transpose(1, 2)  # (B, H + 2·Hkv, T, D)
        qk = qkv[:, : heads + kv_heads]
        if cos is not None:
            qk = apply_rotary(qk, cos, sin)  # q and k rotated together: (B, H + Hkv, T, D)
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        if self.hw is not None and cos is not None:
            if hw is None:
                raise ValueError("a native-RoPE layer needs the grid positions' rotary tables (LayerInputs.hw)")
            q_hw, k_hw = self.hw(x, hw)
            q, k = torch.cat([q, q_hw], dim=-1), torch.cat([k, k_hw], dim=-1)  # (B, H|Hkv, T, 2·D)
        return q, k, v

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The attention probabilities SDPA computes, written out for those who read them (token scoring, DAMRO) or
        need them fused into a compiled graph. q (B, H, Q, D), k (B, Hkv, S, D) rotated; allowed bool, broadcastable
        to (B, 1, Q, S) -> (B, H, Q, S) float32. Query heads are grouped onto their shared key/value head (GQA: head
        h reads kv head h // G) by a reshape, so no key is copied."""
        batch, heads, queries, dim = q.shape
        kv_heads = k.shape[1]
        grouped = q.float().reshape(batch, kv_heads, heads // kv_heads * queries, dim)  # (B, Hkv, G·Q, D)
        scale = self.head_dim**-0.5  # not the width of q: native RoPE's q·k over [t | h | w] keeps the head's scale
        scores = (grouped @ k.float().transpose(-1, -2) * scale).unflatten(2, (heads // kv_heads, queries))
        scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))  # (B, Hkv, G, Q, S)
        return scores.softmax(dim=-1).reshape(batch, heads, queries, -1)

    def forward(self, x: torch.Tensor, inputs: LayerInputs, cache: KVCache | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project_qkv(x, inputs.cos, inputs.sin, inputs.routing, inputs.hw)
        if cache is not None:
            k, v = cache.write(self.layer_index, k, v)  # (B, Hkv, S, D) with S = cached + T
        scale = self.head_dim**-0.5 if self.hw is not None else None  # native RoPE: q, k are 2·D wide
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.attn_mask, is_causal=inputs.is_causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads, scale=scale)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return route(out, inputs.routing, self.o_proj, self.vision.o_proj if self.vision is not None else None)


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

    def forward(self, x: torch.Tensor, inputs: LayerInputs, cache: KVCache | None = None) -> torch.Tensor:
        routing = inputs.routing
        if routing is None:  # text only: the plain path, no gathers
            x = x + self.attn(self.attn_norm(x), inputs, cache)
            return x + self.mlp(self.mlp_norm(x))
        normed = route(x, routing, self.attn_norm, self.vision_attn_norm)
        x = x + self.attn(normed, inputs, cache)
        if self.vision_mlp_norm is not None and self.vision_mlp is not None:
            # both parts routed: one gather/scatter for norm + MLP together
            mlp_out = route(x, routing, lambda h: self.mlp(self.mlp_norm(h)),
                            lambda h: self.vision_mlp(self.vision_mlp_norm(h)))
        else:
            normed = route(x, routing, self.mlp_norm, self.vision_mlp_norm)
            mlp_out = route(normed, routing, self.mlp, self.vision_mlp)
        return x + mlp_out

    def attention_input(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """The attention's input: x (B, T, C) through the input norm (the vision expert's at routed visual tokens)."""
        return route(x, routing, self.attn_norm, self.vision_attn_norm)


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
        # native RoPE: a second table, half a head wide, for the grid row and column of visual tokens
        self.rotary_hw = RotaryTable(replace(config, head_dim=config.resolved_head_dim // 2, rope_scaling=None,
                                             rope_theta=config.rope_theta_hw, native_rope=False, expert_attention=False,
                                             pre_buffer_layers=0)) if config.native_rope else None
        # activation checkpointing: a run-time switch (set by the trainer), not a config field saved with the model
        self.checkpoint_blocks = False
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
    def add_pre_buffer(self, count: int) -> None:
        """Prepend `count` fresh layers (NEO's pre-buffer) to this decoder's. Their output projections (attention
        o_proj and MLP down_proj, the experts' too) start at zero, so each new layer is the identity and the decoder
        computes exactly what it did until training moves them; the other weights start at the usual random init."""
        if count <= 0:
            return
        config = self.config
        config.num_layers += count
        config.pre_buffer_layers += count
        weight = self.embed_tokens.weight
        fresh = [Block(config, index).to(device=weight.device, dtype=weight.dtype) for index in range(count)]
        for block in fresh:
            block.apply(self._init_weights)
            for name, param in block.named_parameters():
                if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias")):
                    param.zero_()
        self.layers = nn.ModuleList([*fresh, *self.layers])
        for index, block in enumerate(self.layers):
            block.attn.layer_index = index  # the KV cache slot of each layer

    @torch.no_grad()
    def init_native_rope_from_text(self) -> None:
        """NEO's start for native RoPE on a loaded LLM: each head's h/w query projection is built from the first and
        third quarters of its text query rows (the high-frequency dims of each rotary half), repeated; the h/w key
        projection is zero and the h/w norms are one, so every score, and the text logits, equal the LLM's."""
        for block in self.layers:
            attn, grid = block.attn, block.attn.hw
            if grid is None:
                continue
            dim, quarter = attn.head_dim, attn.head_dim // 4
            q_rows = attn.qkv_proj.weight[: attn.num_heads * dim].unflatten(0, (attn.num_heads, dim))  # (H, D, C)
            picked = torch.cat([q_rows[:, :quarter], q_rows[:, 2 * quarter : 3 * quarter]], dim=1)  # (H, D/2, C)
            grid.q_proj.weight.copy_(torch.cat([picked, picked], dim=1).flatten(0, 1))
            grid.k_proj.weight.zero_()
            for norm in (grid.q_norm_h, grid.q_norm_w, grid.k_norm_h, grid.k_norm_w):
                norm.weight.fill_(1.0)

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

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        vision_mask: torch.Tensor | None = None,
        grid_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, T) segment ids (0 = padding; 1/0 padding
        masks are one segment per row) or a ready boolean mask (B, 1, T, S); position_ids (B, T); vision_mask (B, T)
        True at visual tokens, which then take the vision experts (when the config has any) and, with
        image_attention = "bidirectional", see the later tokens of their own image; grid_positions (B, T, 2) the
        grid row and column of each token for native RoPE (None: all 0, as for text)."""
        hidden = self.hidden_states(input_ids, inputs_embeds, attention_mask, position_ids, cache, vision_mask,
                                    grid_positions)
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
        grid_positions: torch.Tensor | None = None,
        turn_ids: torch.Tensor | None = None,
        num_blocks: int | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, C) before the output head. `turn_ids` (B, T), training only: 0 for
        shared tokens, k for the tokens of isolated turn k (see `turn_inputs`). `num_blocks`: run only the first
        that many blocks and return their output, without the final norm (no cache)."""
        x = self.embed(input_ids, inputs_embeds)  # (B, T, C)
        if cache is not None:
            cache.check_room(x.shape[1])
        if turn_ids is not None:
            if cache is not None:
                raise ValueError("isolated turns are a training layout; they take no KV cache")
            attention_mask, position_ids = self.turn_inputs(attention_mask, position_ids, turn_ids, vision_mask)
        segment_ids = segments_of(attention_mask)
        if position_ids is None:
            start = cache.next_position if cache is not None and cache.length > 0 else None
            position_ids = self.default_positions(segment_ids, x.shape[:2], start, x.device, vision_mask)
        inputs = self.layer_inputs(x, attention_mask, position_ids, cache, vision_mask, grid_positions)
        if num_blocks is not None:
            if cache is not None:
                raise ValueError("num_blocks reads an inner block's output; it takes no KV cache")
            for block in self.layers[:num_blocks]:
                x = self.run_block(block, x, inputs, None)
            return x
        for block in self.layers:
            x = self.run_block(block, x, inputs, cache)
        if cache is not None:
            cache.advance(position_ids, segment_ids)
        return self.norm(x)

    def run_block(self, block: Block, x: torch.Tensor, inputs: LayerInputs, cache: KVCache | None) -> torch.Tensor:
        """One block on x (B, T, C). With `checkpoint_blocks` on, in training mode with gradients enabled and no KV
        cache, the block keeps only its input for the backward and runs its forward again there: activation memory
        of one layer instead of all of them, for about one more forward of compute. The non-reentrant form keeps
        forward hooks (`align.HiddenCapture`) seeing outputs that carry their graph. The recompute calls the block
        again (its pre-hooks run again; torch stops the recompute early, before the forward hooks, by default)."""
        if self.checkpoint_blocks and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(block, x, inputs, None, use_reentrant=False)
        return block(x, inputs, cache)

    def default_positions(self, segment_ids: torch.Tensor | None, shape: torch.Size, start: torch.Tensor | None,
                          device: torch.device, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE positions (B, T) of new tokens: counted from 0 within each document (padding skipped), continuing
        from `start` (B,), the next position of each row, when earlier tokens are cached. With a
        `visual_position_step` below 1 (V2PE) the visual tokens of `vision_mask` (B, T) advance it by that step
        (float positions). Every image's tokens are followed by its end token, so the next position after a prompt
        is always its last token's + 1."""
        batch, length = shape
        step = self.config.visual_position_step
        if (step != 1 or self.config.native_rope) and vision_mask is not None:
            if segment_ids is None:
                segment_ids = torch.ones(batch, length, dtype=torch.long, device=device)
            if self.config.native_rope:  # NEO: an image's visual tokens share one t; the image advances it by one
                next_is_visual = F.pad(vision_mask[:, 1:], (0, 1), value=False)
                steps = (~(vision_mask & next_is_visual)).long()  # (B, T) 0 or 1: integer positions
            else:
                steps = torch.where(vision_mask, step, 1.0)  # (B, T)
            return position_ids_from_segments(segment_ids, start, steps)
        if segment_ids is None:
            base = torch.arange(length, device=device)[None].expand(batch, length)
            return base if start is None else base + start[:, None]
        return position_ids_from_segments(segment_ids, start)

    def layer_inputs(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                     cache: KVCache | None = None, vision_mask: torch.Tensor | None = None,
                     grid_positions: torch.Tensor | None = None) -> LayerInputs:
        """What the blocks share for x (B, T, C): attention_mask, vision_mask and grid_positions as in `forward`;
        `cache` is the KV cache the new tokens attend through (its filled slots and their segments), or None."""
        attn_mask, is_causal = self.attention_mask(attention_mask, x.shape[:2], cache, vision_mask, x.device)
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, 1, T, D)
        routing = Routing.from_mask(vision_mask) if self.config.has_experts else None
        return LayerInputs(cos, sin, attn_mask, is_causal, routing, self.grid_rotary(grid_positions, x))

    def grid_rotary(self, grid_positions: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Native RoPE's tables for the grid (row, column) positions (B, T, 2) of x's tokens (B, T, C) — None for
        all 0, as for text: (cos_h, sin_h, cos_w, sin_w), each (B, 1, T, D/2); None without native RoPE."""
        if self.rotary_hw is None:
            return None
        if grid_positions is None:
            grid_positions = torch.zeros(*x.shape[:2], 2, dtype=torch.long, device=x.device)
        return (*self.rotary_hw(grid_positions[..., 0], x.dtype), *self.rotary_hw(grid_positions[..., 1], x.dtype))

    def turn_inputs(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                    turn_ids: torch.Tensor, vision_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the boolean mask (B, 1, T, T), positions (B, T)) of rows whose turns are isolated: each question-answer
        turn (turn_ids k >= 1) sees its document's shared tokens (0: the prompt head and the image) and itself, at the
        positions it would have alone after them, so every turn's logits are those of its own single sample, for one
        pass over the shared tokens. attention_mask (B, T) segment ids or None; position_ids None for the default."""
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("isolated turns build their own mask from segment ids, not from a ready 4-D mask")
        batch, length = turn_ids.shape
        segment_ids = segments_of(attention_mask)
        if segment_ids is None:
            segment_ids = torch.ones(batch, length, dtype=torch.long, device=turn_ids.device)
        if position_ids is None:
            position_ids = self.default_positions(segment_ids, turn_ids.shape, None, turn_ids.device, vision_mask)
        position_ids = turn_positions(position_ids, turn_ids, segment_ids)
        mask = build_attention_mask(segment_ids, segment_ids, 0)
        if self.config.sliding_window is not None:  # the window counts positions, which isolated turns reuse
            mask = mask & (position_ids[:, None, :] > position_ids[:, :, None] - self.config.sliding_window)[:, None]
        if self.config.image_attention == "bidirectional" and vision_mask is not None:
            mask = open_images(mask, vision_mask, 0)
        return isolate_turns(mask, turn_ids), position_ids

    def attention_mask(self, attention_mask: torch.Tensor | None, shape: torch.Size, cache: KVCache | None,
                       vision_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """The cheapest correct SDPA arguments (attn_mask, is_causal) for T new tokens after the cache's filled
        slots. `vision_mask` (B, T) matters only with image_attention = "bidirectional" (then the mask is explicit)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.to(torch.bool), False
        batch, length = shape
        past = cache.length if cache is not None else 0
        window = self.config.sliding_window
        window_matters = window is not None and past + length > window
        segment_ids = segments_of(attention_mask)
        trivial = segment_ids is None or not bool((segment_ids != 1).any())  # every token real, one document a row
        has_padding = cache.has_padding if cache is not None else False
        within_images = (self.config.image_attention == "bidirectional" and vision_mask is not None
                         and bool(vision_mask.any()))
        if trivial and not has_padding and not window_matters and not within_images:
            if past == 0:
                return None, length > 1
            if length == 1:
                return None, False  # one new query may see every cached key
        if segment_ids is None:
            segment_ids = torch.ones(batch, length, dtype=torch.long, device=device)
        key_segments = torch.cat([cache.segment_ids[:, :past], segment_ids], dim=1) if past > 0 else segment_ids
        mask = build_attention_mask(segment_ids, key_segments, past, window if window_matters else None)
        if within_images:
            mask = open_images(mask, vision_mask, past)
        return mask, False


def segments_of(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Segment ids (B, T) of a (B, T) attention mask; None for no mask or a ready 4-D one (one document a row)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return None
    return attention_mask.long()
