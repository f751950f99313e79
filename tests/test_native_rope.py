"""NEO's native RoPE (`native_rope`): an image's tokens share one t and carry their grid row/column; a loaded LLM
keeps its text logits at the start; cached == full forward with left padding; packed == unpacked; batched generation
== one at a time; the grid positions matter; what cannot honour it says so."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig
from monovlm.infer.compiled import supports_static_decode
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.infer.reduction import build_reduction
from monovlm.model.kv_cache import KVCache
from tiny_vlm import assert_packed_equals_unpacked, build_vlm, generate_batched_and_alone, picture, small_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def build_native(tokenizer, native: bool = True):
    return build_vlm(tokenizer, embedder="conv", native_rope=native, image_attention="bidirectional")


def test_an_images_tokens_share_one_t_and_carry_their_grid_place(tokenizer):
    model, processor = build_native(tokenizer)
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 1)])
    input_ids = torch.tensor([ids])
    vision = input_ids == model.image_token_id
    t = model.decoder.default_positions(None, input_ids.shape, None, input_ids.device, vision)[0]
    first = int(vision[0].nonzero()[0])
    count = int(vision.sum())
    assert t[:first + 1].tolist() == list(range(first + 1))  # text, then the image's one t
    assert set(t[first : first + count].tolist()) == {first}
    assert t[first + count :].tolist() == list(range(first + 1, first + 1 + len(ids) - first - count))
    grid = model.grid_positions(input_ids, images)[0]
    layout = model.visual_layout(input_ids, images)
    patches = layout.patch_mask[0]
    rows, cols = layout.grids[0]
    assert rows != cols and grid[patches].tolist() == [[r, c] for r in range(rows) for c in range(cols)]
    assert grid[~patches].abs().sum() == 0  # text, CLS, row separators: row 0, column 0


def test_a_loaded_llm_keeps_its_text_logits(tokenizer):
    plain, processor = build_native(tokenizer, native=False)
    native, _ = build_native(tokenizer, native=True)
    missing, unexpected = native.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".attn.hw." in name for name in missing)
    native.decoder.init_native_rope_from_text()
    text = torch.tensor([processor.prompt("how many shapes")[0]])
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 2)])
    with torch.no_grad():
        assert (native(text) - plain(text)).abs().max().item() <= 1e-5
        # with an image too: the h/w keys are zero, so only the shared t of the image's tokens differs
        native_logits, plain_logits = native(torch.tensor([ids]), images), plain(torch.tensor([ids]), images)
    assert native_logits.shape == plain_logits.shape
    grid = native.decoder.layers[0].attn.hw
    assert grid.k_proj.weight.abs().sum() == 0 and grid.q_proj.weight.abs().sum() > 0


def test_cached_decoding_and_batched_generation_equal_the_full_forward(tokenizer):
    model, processor = build_native(tokenizer)
    prompts, batched, rows, images = generate_batched_and_alone(model, processor)
    ids, row_images = prompts[0]
    full_ids = torch.tensor([ids + batched[0].token_ids])
    with torch.no_grad():
        full = model(full_ids, row_images)[0, len(ids) - 1 : -1]
        cache = KVCache.for_model(model, 1, full_ids.shape[1])
        steps = [model(torch.tensor([ids]), row_images, cache=cache)[0, -1]]
        for token in batched[0].token_ids[:-1]:
            steps.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
    assert (torch.stack(steps) - full).abs().max().item() <= 1e-5
    assert cache.keys[0].shape[-1] == 2 * cache.values[0].shape[-1]  # keys [t | h | w]
    assert not supports_static_decode(model, cache)
    compiled = generate(model, rows, GenerationConfig(max_new_tokens=6, compile=True), prefill_inputs={"images": images})
    assert [g.token_ids for g in compiled] == [g.token_ids for g in batched]


def test_packed_logits_and_loss_equal_unpacked(tokenizer):
    assert_packed_equals_unpacked(*build_native(tokenizer), seeds=(5, 6))


def test_the_grid_positions_reach_the_scores(tokenizer):
    model, processor = build_native(tokenizer)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 7)])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds, vision = model.embed(input_ids, images)
        grid = model.grid_positions(input_ids, images)
        placed = model.decoder.hidden_states(inputs_embeds=embeds, vision_mask=vision, grid_positions=grid)
        flat = model.decoder.hidden_states(inputs_embeds=embeds, vision_mask=vision)  # every token at row 0, col 0
    assert (placed[0, -1] - flat[0, -1]).abs().max().item() > 1e-3


def test_what_cannot_honour_it_says_so(tokenizer):
    model, processor = build_native(tokenizer)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 8)])
    with pytest.raises(ValueError, match="renumber.*native RoPE"):
        model(torch.tensor([ids]), images, reduction=build_reduction("fastv", keep=0.5, positions="renumber", layer=1))
    with pytest.raises(ConfigError, match="native_rope"):
        DecoderConfig(native_rope=True, expert_attention=True)
    with pytest.raises(ConfigError, match="native_rope"):
        DecoderConfig(native_rope=True, visual_position_step=0.5)
