"""NEO's native RoPE (`native_rope`): an image's tokens share one t and carry their grid row/column; a loaded LLM
keeps its text logits at the start; cached == full forward with left padding; packed == unpacked; batched generation
== one at a time; the grid positions matter; what cannot honour it says so."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig, VisionConfig, VLMConfig
from monovlm.data.collate import collate, collate_packed
from monovlm.data.processor import Processor
from monovlm.infer.compiled import supports_static_decode
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.infer.reduction import build_reduction
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    words = ["red circle", "blue square", "what colour is it", "how many shapes", "green", "two", "yes", "no"]
    return train_bpe_tokenizer([" ".join(words)] * 20, vocab_size=400)


def build_vlm(tokenizer, native: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.1,
                                    native_rope=native, image_attention="bidirectional"))
    add_image_special_tokens(tokenizer, decoder)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)
    model = EncoderFreeVLM(VLMConfig(decoder=decoder.config, vision=vision)).eval()
    model.decoder.load_state_dict(decoder.state_dict())
    return model, Processor(tokenizer, vision, model.config.processor)


def picture(height, width, seed):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def conversation(question, answer, with_image=True):
    marker = "<image>\n" if with_image else ""
    return {"conversations": [{"from": "human", "value": marker + question}, {"from": "gpt", "value": answer}]}


def test_an_images_tokens_share_one_t_and_carry_their_grid_place(tokenizer):
    model, processor = build_vlm(tokenizer)
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
    plain, processor = build_vlm(tokenizer, native=False)
    native, _ = build_vlm(tokenizer, native=True)
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
    model, processor = build_vlm(tokenizer)
    prompts = [processor.prompt("what colour is it", [picture(16, 24, 3)]),
               processor.prompt("how many shapes are there in the picture", [picture(32, 32, 4)])]
    rows = [ids for ids, _ in prompts]
    images = [image for _, row_images in prompts for image in row_images]
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, rows, config, prefill_inputs={"images": images})
    alone = [generate(model, [ids], config, prefill_inputs={"images": row_images})[0] for ids, row_images in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
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
    model, processor = build_vlm(tokenizer)
    samples = [processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, 5)]),
               processor.process(conversation("how many shapes", "two", with_image=False)),
               processor.process(conversation("how many shapes", "two"), images=[picture(24, 16, 6)])]
    packed = collate_packed([samples], pad_id=0)
    with torch.no_grad():
        packed_logits = model(packed.input_ids, packed.images, attention_mask=packed.attention_mask)[0]
        start = 0
        for sample in samples:
            alone = model(torch.tensor([sample.input_ids]), sample.images)[0]
            assert (packed_logits[start : start + len(sample)] - alone).abs().max().item() <= 1e-5
            start += len(sample)
        padded = collate(samples, pad_id=0)
        loss_padded = model.loss(padded.input_ids, padded.labels, padded.images, padded.attention_mask)
        loss_packed = model.loss(packed.input_ids, packed.labels, packed.images, packed.attention_mask)
    assert abs(loss_padded.item() - loss_packed.item()) <= 1e-5


def test_the_grid_positions_reach_the_scores(tokenizer):
    model, processor = build_vlm(tokenizer)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 7)])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds, vision = model.embed(input_ids, images)
        grid = model.grid_positions(input_ids, images)
        placed = model.decoder.hidden_states(inputs_embeds=embeds, vision_mask=vision, grid_positions=grid)
        flat = model.decoder.hidden_states(inputs_embeds=embeds, vision_mask=vision)  # every token at row 0, col 0
    assert (placed[0, -1] - flat[0, -1]).abs().max().item() > 1e-3


def test_what_cannot_honour_it_says_so(tokenizer):
    model, processor = build_vlm(tokenizer)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 8)])
    with pytest.raises(ValueError, match="token reduction does not support native_rope"):
        model(torch.tensor([ids]), images, reduction=build_reduction("fastv", keep=0.5, layer=1))
    with pytest.raises(ConfigError, match="native_rope"):
        DecoderConfig(native_rope=True, expert_attention=True)
    with pytest.raises(ConfigError, match="native_rope"):
        DecoderConfig(native_rope=True, visual_position_step=0.5)
