"""Attention masks from segment ids: left padding, packed documents and sliding windows in one rule.

A segment-id tensor (B, T) says, for every token, which document it belongs to: 0 is padding, equal positive ids are
one document. A query may attend to a key when the key is not padding, both are in the same document, the key is not
in the future, and (for sliding-window models) the key is within the window. A plain padding mask (1 = token,
0 = pad) is the special case of one document per row, so callers can pass HF-style masks unchanged.
"""

from __future__ import annotations

import torch


def position_ids_from_segments(segment_ids: torch.Tensor, start: torch.Tensor | None = None,
                               steps: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that count tokens within each document, restarting at 0 for each new one. (B, T) -> (B, T).

    Padding gets position 0 (it is never attended, the value only has to be a valid index). `start` (B,) offsets
    each row, for tokens that continue a cached sequence. `steps` (B, T) float, if given, is how far each token
    advances the position (V2PE: a fraction for visual tokens; NEO: 0 inside an image); a token's position is then
    the sum of the steps of the tokens before it in its document (float positions for float steps).
    """
    is_token = segment_ids != 0
    # a document starts where the id changes from the previous token's id
    previous = torch.nn.functional.pad(segment_ids[:, :-1], (1, 0), value=-1)
    starts_doc = is_token & (segment_ids != previous)
    if steps is None:
        counts = is_token.long().cumsum(dim=1)  # (B, T) running token count, this token included
    else:
        # float64 sums for fractional steps: packed rows' positions then equal unpacked ones; integer steps stay long
        own = torch.where(is_token, steps if not steps.is_floating_point() else steps.double(), 0)
        counts = own.cumsum(dim=1) - own + 1  # (B, T) the steps before each token, +1 as in the integer count
    doc_start_count = torch.where(starts_doc, counts, torch.zeros_like(counts)).cummax(dim=1).values
    positions = (counts - doc_start_count).clamp(min=0)
    if start is not None:
        positions = positions + start[:, None]
    positions = torch.where(is_token, positions, torch.zeros_like(positions))
    return positions if steps is None or not steps.is_floating_point() else positions.float()


def build_attention_mask(
    query_segments: torch.Tensor,
    key_segments: torch.Tensor,
    query_offset: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True = may attend.

    query_segments (B, Tq) are the new tokens, which sit at cache slots [query_offset, query_offset + Tq);
    key_segments (B, Tk) cover slots [0, Tk).
    """
    num_queries, num_keys = query_segments.shape[1], key_segments.shape[1]
    device = query_segments.device
    query_slots = torch.arange(query_offset, query_offset + num_queries, device=device)[:, None]  # (Tq, 1)
    key_slots = torch.arange(num_keys, device=device)[None, :]  # (1, Tk)
    allowed = key_slots <= query_slots  # (Tq, Tk) causal
    if sliding_window is not None:
        allowed = allowed & (key_slots > query_slots - sliding_window)
    same_doc = query_segments[:, :, None] == key_segments[:, None, :]  # (B, Tq, Tk)
    mask = allowed[None] & same_doc & (key_segments[:, None, :] != 0)
    # A padding query would see nothing, and an all-False row makes softmax NaN; let it see itself. Its output is
    # never used (no loss, never attended), it only has to stay finite.
    mask = mask | (key_slots == query_slots)[None]
    return mask[:, None]  # (B, 1, Tq, Tk)


def turn_positions(position_ids: torch.Tensor, turn_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) as if each isolated turn followed its document's shared prefix alone: every token of turn k
    moves back by the tokens of the document's earlier turns. turn_ids (B, T): 0 for shared tokens, k >= 1 for the
    tokens of turn k (contiguous); segment_ids (B, T) as above. Turns hold text only (one position per token)."""
    in_turn = turn_ids > 0
    before = in_turn.long().cumsum(dim=1) - in_turn.long()  # (B, T) turn tokens before each token in the row
    previous_turn = torch.nn.functional.pad(turn_ids[:, :-1], (1, 0), value=-1)
    previous_segment = torch.nn.functional.pad(segment_ids[:, :-1], (1, 0), value=-1)
    starts_doc = segment_ids != previous_segment
    starts_block = starts_doc | (turn_ids != previous_turn)
    # `before` never decreases along a row, so a running max carries each block's (document's) starting count
    block_start = torch.where(starts_block, before, torch.zeros_like(before)).cummax(dim=1).values
    doc_start = torch.where(starts_doc, before, torch.zeros_like(before)).cummax(dim=1).values
    offset = torch.where(in_turn, block_start - doc_start, torch.zeros_like(before))
    return position_ids - offset.to(position_ids.dtype)


def isolate_turns(mask: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """mask (B, 1, T, T) with each turn's keys hidden from the other turns' queries: a token of turn k sees the shared
    tokens (turn id 0) and its own turn. turn_ids (B, T) as in `turn_positions`."""
    query, key = turn_ids[:, :, None], turn_ids[:, None, :]  # (B, T, 1), (B, 1, T)
    return mask & ((key == 0) | (key == query))[:, None]


def image_spans(vision_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) long: k at the tokens of the k-th run of visual tokens in the row (from 1), 0 elsewhere.
    The processor brackets every image with start/end tokens, so one run is one image."""
    previous = torch.nn.functional.pad(vision_mask[:, :-1], (1, 0), value=False)
    starts = vision_mask & ~previous
    return torch.where(vision_mask, starts.long().cumsum(dim=1), torch.zeros_like(vision_mask, dtype=torch.long))


def open_images(mask: torch.Tensor, vision_mask: torch.Tensor, query_offset: int) -> torch.Tensor:
    """NEO's rule: besides what `mask` (B, 1, Tq, Tk) allows, the visual tokens of one image see each other both ways.

    vision_mask (B, Tq) marks the new tokens' visual positions (slots [query_offset, query_offset + Tq)); an image
    is never split across calls, so cached keys (slots before query_offset) are left as they are."""
    spans = image_spans(vision_mask)  # (B, Tq)
    key_spans = torch.nn.functional.pad(spans, (query_offset, 0))  # (B, Tk): the keys are the cache, then the new
    same_image = (spans[:, :, None] == key_spans[:, None, :]) & (spans[:, :, None] > 0)  # (B, Tq, Tk)
    return mask | same_image[:, None]
