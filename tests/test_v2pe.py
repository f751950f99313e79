"""V2PE (`visual_position_step`): visual tokens advance the RoPE position by a fraction. Positions by hand, cached ==
full forward with left padding, packed == unpacked, batched generation == one at a time, text-only inputs unchanged,
HF-initialised recipes may set it, and what cannot honour it says so."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig, VisionConfig, VLMConfig
from monovlm.data.collate import collate, collate_packed
from monovlm.data.processor import Processor
from monovlm.infer.generate import GenerationConfig, generate, left_pad
from monovlm.infer.compiled import supports_static_decode
from monovlm.infer.reduction import build_reduction
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import position_ids_from_segments
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer

STEP = 0.3


def tiny_decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(initializer_range=0.08, **overrides)).eval()


def test_positions_advance_by_the_step_on_visual_tokens_and_restart_per_document():
    segments = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
    vision = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    steps = torch.where(vision, 0.25, 1.0)
    positions = position_ids_from_segments(segments, steps=steps)
    assert positions.tolist() == [[0, 0, 0, 1, 1.25, 1.5, 1.75, 0, 1, 1.25]]
    continued = position_ids_from_segments(segments, torch.tensor([10.5]), steps)
    assert continued[0, 2:].tolist() == [p + 10.5 for p in positions[0, 2:].tolist()]
    plain = position_ids_from_segments(segments, steps=torch.ones(1, 10))
    assert plain.tolist() == position_ids_from_segments(segments).float().tolist()  # step 1: the integer count


@pytest.mark.parametrize("step", [0, -0.5, 1.5])
def test_a_step_outside_zero_to_one_is_refused(step):
    with pytest.raises(ConfigError, match="visual_position_step"):
        DecoderConfig(visual_position_step=step)


def test_cached_decoding_equals_full_forward_with_left_padding():
    model = tiny_decoder(visual_position_step=STEP)
    prompts = [[5, 9, 2, 7, 1, 8, 3, 4], [4, 4, 6, 7, 8], [11, 12, 13, 14, 15, 16]]
    image_at = [(1, 5), (2, 4), (0, 3)]  # (start, end) of each prompt's visual tokens
    continuation = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(1))
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
        whole_steps = tiny_decoder()
        whole_steps.load_state_dict(model.state_dict())
        integer = whole_steps(full_ids, attention_mask=full_mask, vision_mask=full_vision)
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5
    assert full.abs().max() > 0.3  # logits large enough for 1e-5 to be a tight bound
    # the next position after the prompt: its last token's + 1, where the first row's 4 visual tokens took 4 × 0.3
    assert cache.next_position.tolist() == pytest.approx([8 - 4 + 4 * STEP + 5, 5 - 2 + 2 * STEP + 5, 6 - 3 + 3 * STEP + 5])
    # tokens before an image sit where they always did; after it, the positions (and so the logits) differ
    first_image = input_ids.shape[1] - len(prompts[0]) + 1
    assert (integer[0, :first_image] - full[0, :first_image]).abs().max().item() <= 1e-5
    assert (integer[0, -1] - full[0, -1]).abs().max().item() > 1e-3


# -------------------------------------------------------------------------------------------------------------------
# the VLM: images through the processor


@pytest.fixture(scope="module")
def tokenizer():
    words = ["red circle", "blue square", "what colour is it", "how many shapes", "green", "two", "yes", "no"]
    return train_bpe_tokenizer([" ".join(words)] * 20, vocab_size=400)


def build_vlm(tokenizer, step: float):
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.1,
                                    visual_position_step=step))
    add_image_special_tokens(tokenizer, decoder)
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)
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


def test_packed_logits_and_loss_equal_unpacked(tokenizer):
    model, processor = build_vlm(tokenizer, STEP)
    samples = [processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, 1)]),
               processor.process(conversation("how many shapes", "two", with_image=False)),
               processor.process(conversation("how many shapes", "two"), images=[picture(24, 16, 2)])]
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


def test_batched_generation_equals_one_at_a_time_and_compile_falls_back_to_the_eager_step(tokenizer):
    model, processor = build_vlm(tokenizer, STEP)
    prompts = [processor.prompt("what colour is it", [picture(16, 24, 3)]),
               processor.prompt("how many shapes are there in the picture", [picture(32, 32, 4)])]
    rows = [ids for ids, _ in prompts]
    images = [image for _, row_images in prompts for image in row_images]
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, rows, config, prefill_inputs={"images": images})
    alone = [generate(model, [ids], config, prefill_inputs={"images": row_images})[0] for ids, row_images in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert not supports_static_decode(model, model.new_cache(1, 8))  # float positions: no static RoPE lookup
    compiled = generate(model, rows, GenerationConfig(max_new_tokens=6, compile=True), prefill_inputs={"images": images})
    assert [g.token_ids for g in compiled] == [g.token_ids for g in batched]


def test_text_only_inputs_are_unchanged_and_images_move_what_follows(tokenizer):
    stepped, processor = build_vlm(tokenizer, STEP)
    whole, _ = build_vlm(tokenizer, 1.0)
    whole.load_state_dict(stepped.state_dict())
    text = torch.tensor([processor.prompt("how many shapes")[0]])
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 5)])
    with torch.no_grad():
        assert torch.equal(stepped(text), whole(text))  # no visual tokens: the integer positions, bitwise
        difference = (stepped(torch.tensor([ids]), images)[0, -1] - whole(torch.tensor([ids]), images)[0, -1])
    assert difference.abs().max().item() > 1e-3


def test_renumbered_reduction_is_refused(tokenizer):
    model, processor = build_vlm(tokenizer, STEP)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 6)])
    with pytest.raises(ValueError, match="renumber.*visual_position_step"):
        model(torch.tensor([ids]), images, reduction=build_reduction("fastv", keep=0.5, positions="renumber", layer=1))
