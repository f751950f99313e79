"""Token reduction, the shared mechanism: every method keeps text and structural tokens, cached decoding equals a full
forward with the same decisions, batch 2 with left padding equals each row alone, keep=1 is bitwise the unreduced
model, the KV cache of later layers shrinks, recomputed attention rows equal the layer's attention, and the FLOPs
accounting counts what ran. Tiny random models (built here), plus the shipped tiny model for FastV at 50%."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from monovlm.config import DecoderConfig, VisionConfig, VLMConfig
from monovlm.infer.generate import GenerationConfig, generate, left_pad
from monovlm.infer.reduction import METHODS, ReducedCache, build_reduction, generation_flops, measure_generation, replay
from monovlm.infer.reduction.accounting import attention_flops, sequence_flops
from monovlm.infer.reduction.base import ReductionContext
from monovlm.infer.reduction.forward import reduced_hidden_states
from monovlm.model.decoder import LayerInputs
from monovlm.model.experts import Routing, route
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import build_attention_mask, position_ids_from_segments
from monovlm.model.rope import apply_rotary
from monovlm.model.vlm import EncoderFreeVLM

IMAGE, START, END = 3, 4, 5
EXPERTS = {"expert_norms": True, "expert_attention": True, "expert_mlp": True, "qk_norm": True, "attention_bias": True}


def build_model(experts: bool = False, num_layers: int = 4, **decoder) -> EncoderFreeVLM:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=num_layers, num_heads=4,
                           num_kv_heads=2, initializer_range=0.1,
                           special_tokens={"image": IMAGE, "image_start": START, "image_end": END},
                           **(EXPERTS if experts else {}), **decoder)
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)  # CLS + SEP
    return EncoderFreeVLM(VLMConfig(decoder=config, vision=vision)).eval()


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def expert_model():
    return build_model(experts=True)


def picture(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def image_block(model, image: torch.Tensor) -> list[int]:
    return [START] + [IMAGE] * model.embedder.token_layout(image).is_patch.numel() + [END]


def batch(model):
    """Row 0: two images and text; row 1 (shorter, left-padded): one image. Grids 6×5, 4×6 and 5×4."""
    images = [picture(48, 40, 1), picture(32, 48, 2), picture(40, 32, 3)]
    rows = [[7, 8] + image_block(model, images[0]) + [9] + image_block(model, images[1]) + [10, 11, 12],
            [13] + image_block(model, images[2]) + [14, 15]]
    input_ids, mask = left_pad(rows)
    return input_ids, mask, images, rows


def new_cache(model, reduction, batch_size, max_length):
    """The reduction's own cache (one KV cache per group of layers), or the plain one without a reduction."""
    if reduction is None:
        return KVCache.for_model(model, batch_size, max_length)
    return reduction.new_cache(model, batch_size, max_length)


def decode(model, cache, input_ids, **kwargs):
    """Later tokens through the cache: a reduced cache runs them itself, a plain one through the model."""
    if isinstance(cache, ReducedCache):
        return cache.decode(input_ids, **kwargs)
    return model(input_ids, cache=cache, **kwargs)


def greedy_with_cache(model, input_ids, mask, images, reduction, steps=4):
    """Prefill (with the reduction) and `steps` cached greedy decode steps: (logits of the prefill and of each step
    (B, steps + 1, V), the tokens fed (B, steps), the cache)."""
    cache = new_cache(model, reduction, input_ids.shape[0], input_ids.shape[1] + steps + 1)
    logits = [model(input_ids, images, attention_mask=mask, cache=cache, last_only=True, reduction=reduction)[:, -1]]
    tokens = []
    for _ in range(steps):
        tokens.append(logits[-1][:, END + 1 :].argmax(dim=-1) + END + 1)  # ordinary text ids only
        logits.append(decode(model, cache, tokens[-1][:, None], last_only=True)[:, -1])
    return torch.stack(logits, dim=1), torch.stack(tokens, dim=1), cache


def test_the_layout_marks_patches_and_the_embedders_structural_tokens():
    """The layout against what the embedder really emits: with the linear embedder, CLS and row separators are the
    learned vectors themselves, so every non-patch position must hold one of them and every patch position neither."""
    vision = VisionConfig(embedder="linear", patch_size=8, merge=1, max_pixels=64 * 64)
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                           special_tokens={"image": IMAGE, "image_start": START, "image_end": END})
    vlm = EncoderFreeVLM(VLMConfig(decoder=config, vision=vision))
    image = picture(24, 40, 0)  # 3 rows × 5 cols
    layout = vlm.embedder.token_layout(image)
    with torch.no_grad():
        tokens = vlm.embedder([image])[0]  # (1 + 3·6, C)
    assert (layout.rows, layout.cols, layout.is_patch.numel()) == (3, 5, tokens.shape[0])
    assert torch.equal(tokens[0], vlm.embedder.cls_token)
    separators = (tokens == vlm.embedder.row_separator).all(dim=1)
    assert separators.tolist() == [False] + ([False] * 5 + [True]) * 3
    assert torch.equal(~layout.is_patch, separators | (torch.arange(tokens.shape[0]) == 0))
    patches = layout.is_patch
    assert layout.grid_row[patches].tolist() == [r for r in range(3) for _ in range(5)]
    assert layout.grid_col[patches].tolist() == list(range(5)) * 3
    bare = EncoderFreeVLM(VLMConfig(decoder=config, vision=VisionConfig(embedder="linear", patch_size=8, merge=1,
                                                                        use_cls=False, use_row_separator=False)))
    assert bool(bare.embedder.token_layout(image).is_patch.all())


ALL = sorted(METHODS)
KEEP = 0.3


def reduction_for(name, keep=KEEP, positions="original"):
    options = {"seed": 5} if name == "random" else {}
    return build_reduction(name, keep=keep, positions=positions, **options)


@pytest.fixture(scope="module")
def bidirectional_model():
    return build_model(image_attention="bidirectional")


@pytest.fixture(scope="module")
def v2pe_model():
    return build_model(visual_position_step=0.3)


@pytest.fixture(scope="module")
def native_model():
    """NEO's native RoPE (with its bidirectional image attention), the h/w keys moved off their zero start."""
    vlm = build_model(native_rope=True, image_attention="bidirectional")
    with torch.no_grad():
        for block in vlm.decoder.layers:
            block.attn.hw.k_proj.weight.normal_(0, 0.3)
    return vlm


@pytest.mark.parametrize("variant", ["plain", "experts", "bidirectional", "v2pe", "native"])
@pytest.mark.parametrize("name", ALL)
def test_cached_decoding_equals_full_forward_with_the_same_decisions(model, expert_model, bidirectional_model,
                                                                    v2pe_model, native_model, name, variant):
    vlm = {"plain": model, "experts": expert_model, "bidirectional": bidirectional_model, "v2pe": v2pe_model,
           "native": native_model}[variant]
    input_ids, mask, images, _ = batch(vlm)
    reduction = reduction_for(name)
    with torch.no_grad():
        cached, tokens, _ = greedy_with_cache(vlm, input_ids, mask, images, reduction)
        trace = reduction.last_trace
        full_ids = torch.cat([input_ids, tokens], dim=1)  # prompt + every token fed to a decode step
        full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        full = vlm(full_ids, images, attention_mask=full_mask, reduction=replay(trace))
    assert trace.stages and trace.stages[-1].kept[0].numel() < mask[0].sum()  # tokens really were dropped
    assert full.shape[1] < full_ids.shape[1]
    steps = cached.shape[1]
    assert (full[:, -steps:] - cached).abs().max().item() <= 1e-5
    assert cached.abs().max() > 0.3  # logits large enough for 1e-5 to be a tight bound


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "visiondrop", "divprune"])
def test_renumbered_positions_decode_like_a_full_forward(model, name):
    input_ids, mask, images, _ = batch(model)
    reduction = reduction_for(name, positions="renumber")
    with torch.no_grad():
        cached, tokens, cache = greedy_with_cache(model, input_ids, mask, images, reduction)
        full_ids = torch.cat([input_ids, tokens], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        full = model(full_ids, images, attention_mask=full_mask, reduction=replay(reduction.last_trace, "renumber"))
        original = greedy_with_cache(model, input_ids, mask, images, reduction_for(name))[0]
    assert (full[:, -cached.shape[1]:] - cached).abs().max().item() <= 1e-5
    assert (cached - original).abs().max() > 1e-4  # renumbering changes the positions the later layers see
    reduced = [group for group in cache.groups if group.first_layer >= reduction.last_trace.stages[0].layer]
    assert reduced
    assert all(bool((group.position_shift > 0).all()) for group in reduced)  # decode continues after the kept end
    assert all(group.position_shift is None for group in cache.groups if group not in reduced)


@pytest.mark.parametrize("name", ALL)
def test_text_and_structural_tokens_are_never_dropped(model, name):
    input_ids, mask, images, _ = batch(model)
    reduction = reduction_for(name)
    with torch.no_grad():
        model(input_ids, images, attention_mask=mask, reduction=reduction)
    layout = model.visual_layout(input_ids, images)
    protected = (mask != 0) & ~layout.patch_mask  # text, image begin/end, CLS, row separators
    for stage in reduction.last_trace.stages:
        for row in range(input_ids.shape[0]):
            kept = torch.zeros(input_ids.shape[1], dtype=torch.bool)
            kept[stage.kept[row]] = True
            assert bool(kept[protected[row]].all())
            for image in layout.image_index[row].unique().tolist():
                if image >= 0:
                    patches = kept & layout.patch_mask[row] & (layout.image_index[row] == image)
                    assert 1 <= int(patches.sum()) < int((layout.patch_mask[row] & (layout.image_index[row] == image)).sum())


@pytest.mark.parametrize("variant", ["plain", "v2pe", "native"])
@pytest.mark.parametrize("name", [n for n in ALL if n != "random"])  # random draws per image of the whole batch
def test_batch_with_left_padding_equals_each_row_alone(model, v2pe_model, native_model, name, variant):
    model = {"plain": model, "v2pe": v2pe_model, "native": native_model}[variant]
    input_ids, mask, images, rows = batch(model)
    with torch.no_grad():
        batched = model(input_ids, images, attention_mask=mask, reduction=reduction_for(name))
        alone_first = model(torch.tensor([rows[0]]), images[:2], reduction=reduction_for(name))
        alone_second = model(torch.tensor([rows[1]]), images[2:], reduction=reduction_for(name))
    assert (batched[0, -alone_first.shape[1]:] - alone_first[0]).abs().max().item() <= 1e-5
    assert (batched[1, -alone_second.shape[1]:] - alone_second[0]).abs().max().item() <= 1e-5
    assert alone_first.shape[1] != alone_second.shape[1]  # the rows kept different counts: the batch was re-padded


@pytest.mark.parametrize("name", ALL)
def test_keeping_everything_is_bitwise_the_unreduced_model(model, expert_model, v2pe_model, native_model, name):
    for vlm in (model, expert_model, v2pe_model, native_model):
        input_ids, mask, images, rows = batch(vlm)
        with torch.no_grad():
            plain = vlm(input_ids, images, attention_mask=mask)
            kept_all = vlm(input_ids, images, attention_mask=mask, reduction=reduction_for(name, keep=1.0))
        assert torch.equal(plain, kept_all)
        config = GenerationConfig(max_new_tokens=6)
        reduction = reduction_for(name, keep=1.0)
        reference = generate(vlm, rows, config, prefill_inputs={"images": images})
        reduced = generate(vlm, rows, config, prefill_inputs={"images": images, "reduction": reduction})
        assert [r.token_ids for r in reduced] == [r.token_ids for r in reference]
        assert reduction.last_trace is not None and reduction.last_trace.stages == []


def test_a_layer_zero_drop_equals_the_decoder_on_the_pruned_sequence(expert_model):
    """Independent of the reduction code: run the plain decoder on the kept tokens at their original positions."""
    input_ids, mask, images, _ = batch(expert_model)
    reduction = build_reduction("random", keep=0.4, seed=3)
    with torch.no_grad():
        reduced = expert_model(input_ids, images, attention_mask=mask, reduction=reduction)
        embeds, vision_mask = expert_model.embed(input_ids, images)
        positions = position_ids_from_segments(mask)
        for row, kept in enumerate(reduction.last_trace.stages[0].kept):
            alone = expert_model.decoder(inputs_embeds=embeds[row, kept][None], position_ids=positions[row, kept][None],
                                         vision_mask=vision_mask[row, kept][None])
            assert (reduced[row, -kept.numel():] - alone[0]).abs().max().item() <= 1e-5
            assert bool(vision_mask[row, kept].any() & ~vision_mask[row, kept].all())  # experts had both kinds


def test_a_drop_inside_the_decoder_equals_a_hand_written_layer_loop(expert_model):
    """FastV at K=2, by hand: two full layers, gather the kept tokens, the rest of the layers on them."""
    ids = [7, 8] + image_block(expert_model, picture(48, 40, 1)) + [9, 10]
    images = [picture(48, 40, 1)]
    input_ids = torch.tensor([ids])
    reduction = build_reduction("fastv", keep=0.4, layer=2)
    decoder = expert_model.decoder
    with torch.no_grad():
        reduced = expert_model(input_ids, images, reduction=reduction)
        x, vision_mask = expert_model.embed(input_ids, images)
        positions = torch.arange(len(ids))[None]
        kept = reduction.last_trace.stages[0].kept[0]
        for index, block in enumerate(decoder.layers):
            if index == 2:
                x, positions, vision_mask = x[:, kept], positions[:, kept], vision_mask[:, kept]
            cos, sin = decoder.rotary(positions, x.dtype)
            x = block(x, LayerInputs(cos, sin, None, True, Routing.from_mask(vision_mask)))
        by_hand = F.linear(decoder.norm(x), decoder.output_weight)
    assert (reduced - by_hand).abs().max().item() <= 1e-5


def test_recomputed_attention_rows_equal_the_layers_attention(expert_model):
    """ReductionContext.attention_rows (few queries, written-out probabilities) vs the layer's own fused projections and a
    full eager softmax under the forward's mask, on a left-padded batch with experts, q/k norms and biases."""
    input_ids, mask, images, _ = batch(expert_model)
    decoder = expert_model.decoder
    layer = 1
    with torch.no_grad():
        hidden, vision_mask = expert_model.embed(input_ids, images)
        hidden = hidden + 0.1 * torch.randn_like(hidden)  # any hidden state will do
        positions = position_ids_from_segments(mask)
        reducer = build_reduction("fastv").bind(expert_model.visual_layout(input_ids, images), decoder.config.num_layers)
        reducer.start(positions, mask, vision_mask)
        ctx = ReductionContext(layer, hidden, reducer.tokens, decoder, reducer.layout.grids, {})
        block = decoder.layers[layer]
        routing = Routing.from_mask(vision_mask)
        normed = route(hidden, routing, block.attn_norm, block.vision_attn_norm)
        qkv = route(normed, routing, block.attn.project_flat, block.attn.vision.project_flat)
        qkv = qkv.unflatten(-1, (-1, block.attn.head_dim)).transpose(1, 2)  # (B, H + 2Hkv, T, D)
        cos, sin = decoder.rotary(positions, hidden.dtype)
        q, k = apply_rotary(qkv[:, :4], cos, sin), apply_rotary(qkv[:, 4:6], cos, sin).repeat_interleave(2, dim=1)
        allowed = build_attention_mask(mask, mask, 0)  # (B, 1, T, T)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
        expected = scores.softmax(dim=-1).mean(dim=1)  # (B, T, T)
        for row in range(input_ids.shape[0]):
            queries = torch.tensor([input_ids.shape[1] - 1, input_ids.shape[1] - 7])
            assert (ctx.attention_rows(row, queries) - expected[row, queries]).abs().max().item() <= 1e-5
        image = ctx.images[1]
        block_probs = expected[image.row][image.patches][:, image.patches]
        causal_mean = block_probs.sum(dim=0) / torch.arange(image.patches.numel(), 0, -1)
        assert (ctx.received_attention(image) - causal_mean).abs().max().item() <= 1e-6


def test_later_layers_cache_only_the_kept_tokens(model):
    input_ids, mask, images, _ = batch(model)
    with torch.no_grad():
        full = greedy_with_cache(model, input_ids, mask, images, None, steps=1)[2]
        pyramid = greedy_with_cache(model, input_ids, mask, images, build_reduction("pyramiddrop", keep=0.5), steps=1)[2]
        early = greedy_with_cache(model, input_ids, mask, images, build_reduction("divprune", keep=0.5), steps=1)[2]
    assert [g.first_layer for g in pyramid.groups] == [0, 1, 2, 3]  # stages at L/4, L/2, 3L/4 of 4 layers
    assert [list(g.layers) for g in pyramid.groups] == [[0], [1], [2], [3]]
    capacities = [g.cache.max_length for g in pyramid.groups]
    assert capacities[0] == full.max_length and capacities == sorted(capacities, reverse=True)
    assert len(set(capacities)) == 4
    assert full.nbytes > early.nbytes and len(early.groups) == 1 and early.groups[0].cache.max_length < full.max_length
    assert pyramid.nbytes < full.nbytes
    for group in pyramid.groups:  # each group's cache holds keys for its own layers only
        assert [layer for layer, k in enumerate(group.cache.keys) if k is not None] == list(group.layers)


def test_a_second_prefill_after_a_reduced_one_attends_through_every_group(model):
    """Multi-turn: several new tokens at once onto a cache split by a reduction equal the full forward (replayed)."""
    input_ids, mask, images, _ = batch(model)
    follow_up = torch.tensor([[20, 21, 22], [23, 24, 25]])
    reduction = build_reduction("fastv", keep=0.4)
    with torch.no_grad():
        cache = reduction.new_cache(model, 2, input_ids.shape[1] + 3)
        model(input_ids, images, attention_mask=mask, cache=cache, reduction=reduction)
        continued = cache.decode(follow_up)
        full = model(torch.cat([input_ids, follow_up], dim=1), images,
                     attention_mask=torch.cat([mask, torch.ones_like(follow_up)], dim=1),
                     reduction=replay(reduction.last_trace))
    assert (full[:, -3:] - continued).abs().max().item() <= 1e-5


def test_bad_settings_are_clear_errors(model):
    input_ids, mask, images, _ = batch(model)
    with pytest.raises(ValueError, match="unknown token reduction method 'fastvv'"):
        build_reduction("fastvv")
    with pytest.raises(ValueError, match="keep=0"):
        build_reduction("fastv", keep=0)
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\]"):
        build_reduction("fastv", depth=3)
    with pytest.raises(ValueError, match="positions="):
        build_reduction("fastv", positions="shuffle")
    with pytest.raises(ValueError, match="layer=7 is outside"):
        model(input_ids, images, attention_mask=mask, reduction=build_reduction("fastv", layer=7))
    with pytest.raises(ValueError, match="empty KV cache"):
        reduction = build_reduction("fastv")
        cache = reduction.new_cache(model, 2, 200)
        model(input_ids, images, attention_mask=mask, cache=cache, reduction=reduction)
        model(input_ids[:, -1:], cache=cache, reduction=reduction)
    with pytest.raises(ValueError, match="not a plain KVCache"):
        model(input_ids, images, attention_mask=mask, cache=KVCache.for_model(model, 2, 200),
              reduction=build_reduction("fastv"))
    with pytest.raises(ValueError, match="sliding-window"):
        windowed = build_model(sliding_window=8)
        windowed(input_ids, images, attention_mask=mask, reduction=build_reduction("fastv"))


def test_text_only_forward_with_a_reduction_is_the_plain_forward(model):
    ids = torch.tensor([[7, 8, 9, 10]])
    reduction = build_reduction("fastv")
    with torch.no_grad():
        assert torch.equal(model(ids, reduction=reduction), model(ids))
    assert reduction.last_trace.stages == []


# ---------------------------------------------------------------------------------------------------------------
# accounting


def test_decode_flops_match_the_matmuls_that_ran_and_count_the_kept_tokens(model):
    """FlopCounterMode counts the matmuls (not SDPA on CPU): they must equal our estimate minus its attention part,
    and the attention part must use each layer's cached length after the reduction."""
    input_ids, mask, images, rows = batch(model)
    config = model.decoder.config
    reduction = build_reduction("fastv", keep=0.3, layer=2)
    with torch.no_grad():
        cache = reduction.new_cache(model, 2, input_ids.shape[1] + 2)
        model(input_ids, images, attention_mask=mask, cache=cache, last_only=True, reduction=reduction)
        with FlopCounterMode(display=False) as counter:
            cache.decode(torch.tensor([[20], [21]]), last_only=True)
    per_layer = reduction.last_trace.tokens_per_layer()
    assert per_layer[0][:2] == [len(rows[0])] * 2 and per_layer[0][2] < len(rows[0])
    estimate = generation_flops(model, [len(r) for r in rows], decode_steps=1, trace=reduction.last_trace)
    attention = sum(attention_flops(config, t + 1) for row in per_layer for t in row)
    assert counter.get_total_flops() == pytest.approx(estimate.decode - attention, rel=1e-9)
    for group in cache.groups:  # each layer group caches exactly the real tokens its layers processed, plus one
        real = (group.cache.segment_ids[:, : group.cache.length] != 0).sum(dim=1).tolist()
        assert real == [per_layer[row][group.first_layer] + 1 for row in range(2)]
    unreduced = generation_flops(model, [len(r) for r in rows], decode_steps=1)
    assert estimate.prefill < unreduced.prefill and estimate.decode < unreduced.decode


def test_prefill_flops_match_the_matmuls_of_a_reduced_prefill(model):
    _, _, images, rows = batch(model)
    config = model.decoder.config
    input_ids = torch.tensor([rows[0]])
    reduction = build_reduction("uniform", keep=0.5)
    with torch.no_grad():
        embeds, vision_mask = model.embed(input_ids, images[:2])
        reducer = reduction.bind(model.visual_layout(input_ids, images[:2]), config.num_layers)
        with FlopCounterMode(display=False) as counter:  # the decoder's part of a reduced VLM prefill
            hidden = reduced_hidden_states(model.decoder, embeds, None, None, None, vision_mask, reducer)
            F.linear(hidden[:, -1:], model.decoder.output_weight)
    kept = reduction.last_trace.tokens_per_layer()[0]
    assert kept == [kept[0]] * config.num_layers and kept[0] < len(rows[0])
    attention = sum(attention_flops(config, t * (t + 1) / 2) for t in kept)
    estimate = sequence_flops(config, kept, decode_steps=0).prefill
    assert counter.get_total_flops() == pytest.approx(estimate - attention, rel=1e-9)


def test_measure_generation_reports_times_and_a_smaller_cache(model):
    input_ids, mask, images, rows = batch(model)
    plain = measure_generation(model, input_ids, mask, images, new_tokens=3, repeats=1, warmup=0)
    reduced = measure_generation(model, input_ids, mask, images, reduction=build_reduction("fastv", keep=0.3),
                                 new_tokens=3, repeats=1, warmup=0)
    assert plain.prefill_ms > 0 and plain.decode_ms_per_token > 0 and plain.peak_memory_bytes is None
    assert reduced.kv_cache_bytes < plain.kv_cache_bytes
    assert plain.tokens_per_layer == [[len(r)] * 4 for r in rows]
    assert reduced.tokens_per_layer[0][3] < len(rows[0])


# ---------------------------------------------------------------------------------------------------------------
# the shipped tiny model


def test_fastv_at_half_keeps_the_shipped_model_answering_sensibly():
    from monovlm.data.processor import Processor
    from monovlm.data.synthetic import COLORS, KINDS, POSITIONS, SIZES, render_scene, sample_scene, scene_questions
    from monovlm.paths import DEFAULT_MODEL_DIR
    from monovlm.tokenizer import Tokenizer

    vlm = EncoderFreeVLM.load(DEFAULT_MODEL_DIR).eval()
    tokenizer = Tokenizer.from_folder(DEFAULT_MODEL_DIR)
    processor = Processor(tokenizer, vlm.config.vision, vlm.config.processor)
    prompts, images = [], []
    for index in range(8):
        scene = sample_scene(123, index)
        question = scene_questions(scene, np.random.default_rng(index))[0]
        ids, tensors = processor.prompt(question["question"], [render_scene(scene)])
        prompts.append(ids)
        images += tensors
    config = GenerationConfig(max_new_tokens=8, stop_ids=processor.stop_ids)
    pad = tokenizer.pad_id or 0
    reduction = build_reduction("fastv", keep=0.5)
    plain = [g.text.strip() for g in generate(vlm, prompts, config, tokenizer, pad, {"images": images})]
    reduced = [g.text.strip() for g in generate(vlm, prompts, config, tokenizer, pad,
                                                {"images": images, "reduction": reduction})]
    answers = set(COLORS) | set(KINDS) | set(SIZES) | {p for row in POSITIONS for p in row} | {"yes", "no"}
    answers |= {str(n) for n in range(10)}
    assert all(text in answers for text in reduced), reduced
    assert sum(a == b for a, b in zip(plain, reduced)) >= 6, (plain, reduced)
    grid = 64 // vlm.config.vision.pixels_per_token
    kept = reduction.last_trace.tokens_per_layer()[0]
    assert kept[0] - kept[-1] == grid * grid // 2  # half of the 8×8 patches dropped from layer 2 on


def test_native_rope_tokens_kept_before_the_first_layer_keep_their_grid_positions(native_model):
    """DivPrune at layer 0 drops patches before the decoder: the reduced forward must equal the decoder run on the
    kept tokens alone, each at its own position and its own grid row and column."""
    vlm = native_model
    input_ids, _, images, rows = batch(vlm)
    ids, images = torch.tensor([rows[1]]), images[2:]
    reduction = build_reduction("divprune", keep=0.3, layer=0)
    with torch.no_grad():
        reduced = vlm(ids, images, reduction=reduction)
        kept = reduction.last_trace.stages[0].kept[0]  # original indices of the kept tokens
        embeds, vision_mask = vlm.embed(ids, images)
        positions = vlm.decoder.default_positions(None, ids.shape, None, ids.device, vision_mask)
        grid = vlm.grid_positions(ids, images)
        alone = vlm.decoder(inputs_embeds=embeds[:, kept], position_ids=positions[:, kept],
                            vision_mask=vision_mask[:, kept], grid_positions=grid[:, kept])
        flat = vlm.decoder(inputs_embeds=embeds[:, kept], position_ids=positions[:, kept],
                           vision_mask=vision_mask[:, kept])  # every kept token at grid (0, 0)
    assert kept.numel() < ids.shape[1]
    assert (reduced - alone).abs().max().item() <= 1e-5
    assert (reduced - flat).abs().max().item() > 1e-3
