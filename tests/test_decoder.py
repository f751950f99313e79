"""Decoder exactness: cached vs full forward, packed vs unpacked, inputs_embeds vs ids, masks and positions."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig
from monovlm.infer.generate import left_pad
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import build_attention_mask, image_spans, open_images, position_ids_from_segments


def tiny(**overrides) -> Decoder:
    config = DecoderConfig(initializer_range=0.08, **overrides)
    return Decoder(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "attention_bias": True}, {"sliding_window": 6}])
def test_cached_decoding_equals_full_forward_with_left_padding(overrides):
    model = tiny(**overrides)
    prompts = [[5, 9, 2, 7, 1, 8, 3], [4, 4, 6], [11, 12, 13, 14, 15]]
    continuation = torch.randint(0, 512, (3, 6))
    input_ids, mask = left_pad(prompts)
    full_ids = torch.cat([input_ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask)  # (B, T, V)
        cache = KVCache.for_model(model, batch_size=3, max_length=full_ids.shape[1])
        steps = [model(input_ids, attention_mask=mask, cache=cache)]
        for t in range(continuation.shape[1]):
            steps.append(model(continuation[:, t : t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5
    assert full.abs().max() > 0.3  # logits large enough that 1e-5 is a tight bound


def test_left_padding_does_not_change_a_row():
    model = tiny()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1]]
    input_ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=mask)
        alone = model(torch.tensor([prompts[1]]))
    assert (batched[1, -3:] - alone[0]).abs().max().item() <= 1e-5


def test_packed_documents_equal_separate_forwards():
    model = tiny()
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    packed = torch.tensor([sum(docs, [])])
    segments = torch.tensor([[1] * 4 + [2] * 3 + [3] * 5])
    with torch.no_grad():
        packed_logits = model(packed, attention_mask=segments)[0]
        separate = torch.cat([model(torch.tensor([d]))[0] for d in docs])
    assert (packed_logits - separate).abs().max().item() <= 1e-5


def test_position_ids_restart_per_document_and_skip_padding():
    segments = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
    assert position_ids_from_segments(segments).tolist() == [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0]]


def test_inputs_embeds_equal_input_ids():
    model = tiny()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), model(inputs_embeds=model.embed_tokens(ids)))


def test_explicit_position_ids_are_used():
    model = tiny()
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        default = model(ids)
        same = model(ids, position_ids=torch.arange(6)[None])
        shifted = model(ids, position_ids=torch.arange(6)[None] * 3)  # a constant shift would cancel in RoPE
    assert torch.equal(default, same)
    assert (default - shifted).abs().max() > 1e-3


def test_kv_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = KVCache.for_model(model, batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)


def test_resize_vocab_keeps_old_logits():
    model = tiny()
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        before = model(ids)
        model.resize_vocab(520)
        after = model(ids)
    assert after.shape[-1] == 520 and model.config.vocab_size == 520
    assert torch.equal(before, after[..., :512])
    with pytest.raises(ValueError, match="cannot shrink"):
        model.resize_vocab(100)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="rope_scaling type 'dynamic'"):
        DecoderConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="architecture"):
        DecoderConfig(architecture="gpt2")
    with pytest.raises(ConfigError, match="image_attention='full'"):
        DecoderConfig(image_attention="full")


def test_image_spans_number_each_run_of_visual_tokens():
    vision = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert image_spans(vision).tolist() == [[0, 1, 1, 0, 0, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 2, 2]]


def test_open_images_adds_exactly_the_later_tokens_of_the_same_image():
    vision = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)  # text, image 1 (3), text, image 2 (2), text
    segments = torch.ones(1, 8, dtype=torch.long)
    causal = build_attention_mask(segments, segments, 0)
    opened = open_images(causal, vision, 0)[0, 0]
    added = (opened & ~causal[0, 0]).nonzero().tolist()
    assert added == [[1, 2], [1, 3], [2, 3], [5, 6]]  # (query, key): earlier image token -> later one, same image
    # a cached prefix: the new tokens sit at slots 3..10 and the cached keys 0..2 are left as they were
    cached = build_attention_mask(segments, torch.ones(1, 11, dtype=torch.long), 3)
    opened = open_images(cached, vision, 3)[0, 0]
    assert (opened & ~cached[0, 0]).nonzero().tolist() == [[1, 5], [1, 6], [2, 6], [5, 9]]


def test_bidirectional_images_see_later_patches_and_text_stays_causal():
    torch.manual_seed(0)
    causal, bidirectional = tiny(), tiny(image_attention="bidirectional")
    bidirectional.load_state_dict(causal.state_dict())
    ids = torch.randint(0, 512, (1, 12))
    vision = torch.zeros(1, 12, dtype=torch.bool)
    vision[0, 3:8] = True
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 512  # the image's last token
    with torch.no_grad():
        for model, earlier_image_moves in ((causal, False), (bidirectional, True)):
            before, after = (model.hidden_states(x, vision_mask=vision) for x in (ids, changed))
            assert torch.equal(before[0, :3], after[0, :3])  # the text before the image never sees it
            assert (before[0, 3:7] - after[0, 3:7]).abs().max().item() > 1e-3 if earlier_image_moves else \
                torch.equal(before[0, 3:7], after[0, 3:7])
        # without visual tokens (or with image_attention causal) the two models are the same function
        assert torch.equal(causal(ids), bidirectional(ids))
        assert torch.equal(causal(ids, vision_mask=torch.zeros_like(vision)),
                           bidirectional(ids, vision_mask=torch.zeros_like(vision)))


def test_bidirectional_cached_decoding_equals_full_forward_with_left_padding():
    model = tiny(image_attention="bidirectional")
    prompts = [[5, 9, 2, 7, 1, 8, 3, 4], [4, 4, 6, 7, 8], [11, 12, 13, 14, 15, 16]]
    image_at = [(1, 5), (2, 4), (0, 3)]  # (start, end) of each prompt's visual tokens
    continuation = torch.randint(0, 512, (3, 5))
    input_ids, mask = left_pad(prompts)
    vision = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (prompt, (start, end)) in enumerate(zip(prompts, image_at)):
        pad = input_ids.shape[1] - len(prompt)
        vision[row, pad + start : pad + end] = True
    full_ids = torch.cat([input_ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    full_vision = torch.cat([vision, torch.zeros_like(continuation, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, vision_mask=full_vision)
        cache = KVCache.for_model(model, batch_size=3, max_length=full_ids.shape[1])
        steps = [model(input_ids, attention_mask=mask, cache=cache, vision_mask=vision)]
        for t in range(continuation.shape[1]):
            steps.append(model(continuation[:, t : t + 1], cache=cache))
        causal = tiny()
        causal.load_state_dict(model.state_dict())
        causal_full = causal(full_ids, attention_mask=full_mask, vision_mask=full_vision)
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5
    assert (causal_full[real] - full[real]).abs().max().item() > 1e-3  # the images' own attention did change
