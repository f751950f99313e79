"""The encoder-free VLM: token counts agree between processor and model, packed == unpacked, experts route by
modality, the scatter places each visual token, save/load round trip, generation with images."""

import pytest
import torch
from PIL import Image

from monovlm.config import ConfigError, DecoderConfig, ProcessorConfig, VisionConfig, VLMConfig
from monovlm.data.collate import collate, length_grouped_batches, pack
from monovlm.data.images import num_image_tokens
from monovlm.data.processor import IGNORE_INDEX, Processor, SampleError
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.model.decoder import Decoder
from monovlm.model.embedders import build_embedder
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.train.parts import set_trainable
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from tiny_vlm import assert_packed_equals_unpacked

VISION_SETTINGS = {
    "linear": VisionConfig(embedder="linear", patch_size=8, merge=1, use_cls=False, max_pixels=64 * 64),
    "eve": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64),
    "conv": VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64),
    "eve+context": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64,
                                embedder_context=3),
    "eve+conv-stem": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64,
                                  stem="conv", stem_depth=2),
    "conv+conv-stem": VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64,
                                   stem="conv"),
    "eve+patch+conv-stem": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32,
                                        max_pixels=64 * 64, stem="patch+conv"),
    "eve+cnn-stem": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64,
                                 stem="cnn"),
    "eve+patch+cnn-stem": VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32,
                                       max_pixels=64 * 64, stem="patch+cnn"),
}


@pytest.fixture(scope="module")
def tokenizer():
    words = ["red circle", "blue square", "what colour is it", "how many shapes", "green", "two", "yes", "no"]
    return train_bpe_tokenizer([" ".join(words)] * 20, vocab_size=400)


def build(tokenizer, vision: VisionConfig, template="chatml", **decoder_overrides):
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.1,
                                    **decoder_overrides))
    add_image_special_tokens(tokenizer, decoder)
    config = VLMConfig(decoder=decoder.config, vision=vision, processor=ProcessorConfig(template=template))
    model = EncoderFreeVLM(config).eval()
    model.decoder.load_state_dict(decoder.state_dict())
    return model, Processor(tokenizer, vision, config.processor)


def image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def sample(question="what colour is it", answer="red"):
    return {"conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("kind", list(VISION_SETTINGS))
@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (7, 7), (4000, 3000), (33, 65)])
def test_processor_and_model_agree_on_token_counts(tokenizer, kind, size):
    model, processor = build(tokenizer, VISION_SETTINGS[kind])
    picture = Image.new("RGB", (size[1], size[0]), (200, 10, 10))
    processed = processor.process(sample(), images=[picture])
    placeholders = processed.input_ids.count(processor.image_id)
    assert placeholders == num_image_tokens(size[0], size[1], VISION_SETTINGS[kind])
    with torch.no_grad():
        produced = model.embedder(processed.images)[0].shape[0]
    assert produced == placeholders
    logits = model(torch.tensor([processed.input_ids]), processed.images)  # the scatter accepts it
    assert logits.shape[1] == len(processed.input_ids)


def test_labels_cover_only_the_answer(tokenizer):
    _, processor = build(tokenizer, VISION_SETTINGS["conv"])
    processed = processor.process(sample(answer="green"), images=[image(16, 24)])
    labelled = [t for t, label in zip(processed.input_ids, processed.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "green<|im_end|>"
    assert all(label == IGNORE_INDEX for t, label in zip(processed.input_ids, processed.labels) if t == processor.image_id)


def test_plain_template_labels_the_caption(tokenizer):
    _, processor = build(tokenizer, VISION_SETTINGS["conv"], template="plain")
    caption = {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]}
    processed = processor.process(caption, images=[image(16, 16)])
    labelled = [t for t, label in zip(processed.input_ids, processed.labels) if label != IGNORE_INDEX]
    assert labelled[-1] == tokenizer.eos_id and tokenizer.decode(labelled[:-1]) == "a red circle"
    assert processed.input_ids[0] == processor.image_start_id


def test_bad_samples_raise_sample_error(tokenizer):
    _, processor = build(tokenizer, VISION_SETTINGS["conv"])
    with pytest.raises(SampleError, match="markers"):
        processor.process(sample(question="<image> <image> two?"), images=[image(16, 16)])
    with pytest.raises(SampleError, match="speaker"):
        processor.process({"conversations": [{"from": "robot", "value": "hi"}]})
    with pytest.raises(SampleError, match="escapes"):
        processor.process({"image": "../../etc/passwd", **sample()}, image_root="/tmp/root")


@pytest.mark.parametrize("kind,image_attention", [("conv", "causal"), ("eve", "causal"), ("eve", "bidirectional"),
                                                  ("eve+context", "causal")])
def test_packed_logits_equal_unpacked(tokenizer, kind, image_attention):
    assert_packed_equals_unpacked(*build(tokenizer, VISION_SETTINGS[kind], image_attention=image_attention))


def test_scatter_puts_each_visual_token_at_its_placeholder(tokenizer):
    model, processor = build(tokenizer, VISION_SETTINGS["conv"])
    first = processor.process(sample(), images=[image(16, 16, seed=3)])
    second = processor.process(sample(), images=[image(24, 16, seed=4)])
    batch = collate([first, second], pad_id=0)
    with torch.no_grad():
        embeds, vision_mask = model.embed(batch.input_ids, batch.images)
        expected = model.embedder(batch.images)
    assert torch.equal(embeds[1][vision_mask[1]], expected[1])
    assert torch.equal(embeds[0][vision_mask[0]], expected[0])
    text = ~vision_mask
    assert torch.equal(embeds[text], model.decoder.embed_tokens(batch.input_ids)[text])


def test_experts_copied_from_text_change_nothing_on_text(tokenizer):
    plain, processor = build(tokenizer, VISION_SETTINGS["conv"])
    experts, _ = build(tokenizer, VISION_SETTINGS["conv"], expert_norms=True, expert_attention=True, expert_mlp=True)
    experts.load_state_dict(plain.state_dict(), strict=False)
    experts.decoder.init_experts_from_text()
    processed = processor.process(sample(), images=[image(16, 16)])
    ids = torch.tensor([processed.input_ids])
    with torch.no_grad():
        assert (plain(ids, processed.images) - experts(ids, processed.images)).abs().max().item() <= 1e-5
        # the experts route by modality: moving only the vision MLP changes visual positions' outputs ...
        for block in experts.decoder.layers:
            block.vision_mlp.down_proj.weight.add_(0.5)
        hidden_plain = plain.hidden_states(ids, processed.images)
        hidden_experts = experts.hidden_states(ids, processed.images)
        # ... and nothing before the first visual token (causal attention: text before the image is untouched)
        first_visual = processed.input_ids.index(processor.image_id)
        assert torch.equal(hidden_plain[0, :first_visual], hidden_experts[0, :first_visual])
        assert (hidden_plain[0, first_visual] - hidden_experts[0, first_visual]).abs().max() > 1e-3
        # text-only input takes the text path everywhere
        text_ids = torch.tensor([tokenizer.encode("how many shapes")])
        assert torch.equal(plain(text_ids), experts(text_ids))


def tokens_moved(vision: VisionConfig, row: int, col: int) -> tuple[torch.Tensor, torch.nn.Module]:
    """Which tokens of a 7×7-token image (no CLS, no separators) change when the pixels under token (row, col)
    change -> (7, 7) bool, and the embedder it measured."""
    vision = VisionConfig(**{**vision.to_dict(), "use_cls": False, "use_row_separator": False})
    torch.manual_seed(0)
    embedder = build_embedder(vision, hidden_size=32).eval()
    ppt = vision.pixels_per_token
    pixels = torch.rand(3, 7 * ppt, 7 * ppt) * 2 - 1
    changed = pixels.clone()
    changed[:, row * ppt:(row + 1) * ppt, col * ppt:(col + 1) * ppt] += 0.5
    with torch.no_grad():
        before, after = (embedder([p])[0].view(7, 7, -1) for p in (pixels, changed))
    return (after - before).abs().amax(-1) > 1e-6, embedder


@pytest.mark.parametrize("kind", ["linear", "eve", "conv"])
@pytest.mark.parametrize("context", [0, 3, 5])
def test_embedder_context_reaches_exactly_the_neighbouring_tokens(kind, context):
    """With `embedder_context = k`, changing the pixels under one token changes the grid tokens within k // 2 tokens
    of it (rows and columns) and no others; with 0 only that token changes."""
    vision = VisionConfig(**{**VISION_SETTINGS[kind].to_dict(), "embedder_context": context})
    moved, _ = tokens_moved(vision, 3, 1)
    reach = context // 2
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    expected = ((rows - 3).abs() <= reach) & ((cols - 1).abs() <= reach)
    assert torch.equal(moved, expected)


@pytest.mark.parametrize("side", [-1, 2, 4])
def test_embedder_context_must_be_zero_or_odd(side):
    with pytest.raises(ConfigError, match="embedder_context"):
        VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_context=side)


@pytest.mark.parametrize("kind, stem", [("eve", "conv"), ("conv", "conv"), ("eve", "patch+conv")])
@pytest.mark.parametrize("depth", [1, 2])
def test_conv_stem_sees_one_token_around_its_own(kind, stem, depth):
    """`stem = "conv"` (or "patch+conv"): the 3×3 convs see across patch borders, so a token's pixels reach exactly
    the tokens whose receptive field (composed from the stem's convs: kernel 3, padding 1, stride 2 or 1) covers them;
    the patch stem keeps each token to its own pixels (the test above)."""
    vision = VisionConfig(**{**VISION_SETTINGS[kind].to_dict(), "stem": stem, "stem_depth": depth})
    moved, embedder = tokens_moved(vision, 3, 3)
    stem_convs = [m for m in embedder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(stem_convs) == 2 * depth  # log2(patch_size 4) halvings, `depth` 3×3 convs each
    ppt = vision.pixels_per_token

    def pixels_seen(patch: int) -> tuple[int, int]:  # first and last pixel row the stem's output row `patch` sees
        first, last = patch, patch
        for conv in reversed(stem_convs):
            stride = conv.stride[0]
            first, last = first * stride - 1, last * stride + 1
        return first, last

    reached = []  # tokens (rows or columns) whose two patches see the changed pixels 3·ppt .. 4·ppt - 1
    for token in range(7):
        first, last = pixels_seen(2 * token)[0], pixels_seen(2 * token + 1)[1]
        reached.append(first <= 4 * ppt - 1 and last >= 3 * ppt)
    reached = torch.tensor(reached)
    assert reached.sum() > 1  # more than the token itself
    assert torch.equal(moved, reached[:, None] & reached[None, :])


def test_patch_plus_conv_stem_is_the_patch_stem_plus_the_conv_stem():
    vision = VISION_SETTINGS["eve+patch+conv-stem"]
    torch.manual_seed(0)
    summed = build_embedder(vision, hidden_size=64).stem
    pixels = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        both = summed(pixels)  # (2, width, 4, 6)
        patch = torch.nn.functional.conv2d(pixels, summed.patch.weight, stride=vision.patch_size)
        assert not torch.allclose(both, patch, atol=1e-3)
        summed.convs[-1].weight.zero_()
        summed.convs[-1].bias.zero_()  # the conv branch silenced: the patch stem's linear view alone
        torch.testing.assert_close(summed(pixels), patch)


def test_a_frozen_cnn_stem_normalises_with_its_running_statistics_and_keeps_them(tokenizer):
    """`stem = "cnn"` in a stage that does not train the embedder: its BatchNorm layers use and keep the statistics
    they were trained to (the tokens equal those of eval mode), while a trained embedder's move with each batch."""
    model, _ = build(tokenizer, VISION_SETTINGS["eve+cnn-stem"])
    norms = [m for m in model.embedder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3  # 5×5 s2, 3×3, pool + 3×3
    images = [torch.randn(3, 16, 16) * 2 + 1, torch.randn(3, 16, 16) * 2 + 1]
    model.train()
    model.embedder(images)  # trained: the running statistics move towards this batch's
    trained_mean = norms[0].running_mean.clone()
    assert trained_mean.abs().max().item() > 1e-3
    with torch.no_grad():
        expected = model.eval().embedder(images)
    model.train()
    set_trainable(model, ["decoder"])
    frozen = model.embedder(images)
    assert torch.equal(norms[0].running_mean, trained_mean)
    for got, want in zip(frozen, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("settings, match", [
    (dict(embedder="linear", patch_size=8, merge=1, stem="conv"), "linear embedder has no stem"),
    (dict(embedder="linear", patch_size=8, merge=1, stem="cnn"), "linear embedder has no stem"),
    (dict(embedder="eve", patch_size=6, merge=2, stem="cnn"), "power of two"),
    (dict(embedder="linear", patch_size=8, merge=1, stem="patch+conv"), "linear embedder has no stem"),
    (dict(embedder="eve", patch_size=6, merge=2, stem="conv"), "power of two"),
    (dict(embedder="eve", patch_size=4, merge=2, stem="convnext"), "stem='convnext'"),
    (dict(embedder="conv", patch_size=4, merge=2, stem="conv", stem_depth=0), "stem_depth"),
])
def test_stem_settings_are_checked(settings, match):
    with pytest.raises(ConfigError, match=match):
        VisionConfig(**settings)


@pytest.mark.parametrize("kind", ["eve", "eve+context", "eve+conv-stem", "eve+patch+conv-stem", "eve+cnn-stem",
                                  "eve+patch+cnn-stem"])
def test_save_load_round_trip_and_generation(tokenizer, tmp_path, kind):
    model, processor = build(tokenizer, VISION_SETTINGS[kind], expert_mlp=True)
    model.save(tmp_path, tokenizer)
    loaded = EncoderFreeVLM.load(tmp_path)
    ids, tensors = processor.prompt("what colour is it", [image(16, 16)])
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids]), tensors), loaded(torch.tensor([ids]), tensors))
    # cached generation with an image equals greedy re-computation of full forwards
    result = generate(loaded, [ids], GenerationConfig(max_new_tokens=6), prefill_inputs={"images": tensors})[0]
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(6):
            sequence.append(int(loaded(torch.tensor([sequence]), tensors)[0, -1].argmax()))
    assert result.token_ids == sequence[len(ids):]


def test_pack_and_length_groups_keep_every_sample():
    lengths = [5, 17, 9, 3, 30, 12, 8, 1]
    rows = pack(lengths, max_length=30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 30 for row in rows)
    batches = length_grouped_batches(lengths, batch_size=3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, batch_size=3, seed=0)
