"""A tiny encoder-free VLM with a processor, and the exactness checks every decoder switch must pass with images
(packed == unpacked, batched generation == one at a time). Used by the tests of the switches (V2PE, native RoPE)."""

import torch
from PIL import Image

from monovlm.config import DecoderConfig, VisionConfig, VLMConfig
from monovlm.data.collate import collate, collate_packed
from monovlm.data.processor import Processor
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.model.decoder import Decoder
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer

WORDS = ["red circle", "blue square", "what colour is it", "how many shapes", "green", "two", "yes", "no"]


def small_tokenizer():
    return train_bpe_tokenizer([" ".join(WORDS)] * 20, vocab_size=400)


def build_vlm(tokenizer, embedder: str = "eve", seed: int = 0, **decoder_overrides):
    """(model, processor): 2 layers of width 64 (unless overridden), images of at most 64×64 px; decoder_overrides
    switch features on."""
    torch.manual_seed(seed)
    shape = {"num_layers": 2, **decoder_overrides}
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_heads=4, num_kv_heads=2, initializer_range=0.1, **shape))
    add_image_special_tokens(tokenizer, decoder)
    vision = VisionConfig(embedder=embedder, patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)
    model = EncoderFreeVLM(VLMConfig(decoder=decoder.config, vision=vision)).eval()
    model.decoder.load_state_dict(decoder.state_dict())
    return model, Processor(tokenizer, vision, model.config.processor)


def picture(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def conversation(question, answer, with_image=True):
    marker = "<image>\n" if with_image else ""
    return {"conversations": [{"from": "human", "value": marker + question}, {"from": "gpt", "value": answer}]}


def assert_packed_equals_unpacked(model, processor, seeds=(1, 2)):
    """Two samples with images and a text-only one: packed into one row, each sample's logits equal its own forward,
    and the packed loss equals the padded batch's."""
    samples = [processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, seeds[0])]),
               processor.process(conversation("how many shapes", "two", with_image=False)),
               processor.process(conversation("how many shapes", "two"), images=[picture(24, 16, seeds[1])])]
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


def generate_batched_and_alone(model, processor, max_new_tokens=6):
    """Two prompts of different lengths, each with an image: greedy generation batched (left-padded) must give each
    row's tokens alone. -> (prompts [(ids, images)], batched results, rows, all images)."""
    prompts = [processor.prompt("what colour is it", [picture(16, 24, 3)]),
               processor.prompt("how many shapes are there in the picture", [picture(32, 32, 4)])]
    rows = [ids for ids, _ in prompts]
    images = [image for _, row_images in prompts for image in row_images]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    batched = generate(model, rows, config, prefill_inputs={"images": images})
    alone = [generate(model, [ids], config, prefill_inputs={"images": row_images})[0] for ids, row_images in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    return prompts, batched, rows, images


def assert_cached_equals_full(model, processor, size=(24, 16), continuation=(57, 63, 91)):
    """One prompt with an image, then a few text tokens (3 is the image placeholder, so not among them): a cached
    prefill and token-by-token decode give the full forward's logits."""
    ids, images = processor.prompt("how many shapes are there", [picture(*size, 4)])
    full_ids = torch.tensor([ids + list(continuation)])
    with torch.no_grad():
        full = model(full_ids, images)
        cache = model.new_cache(1, full_ids.shape[1])
        steps = [model(torch.tensor([ids]), images, cache=cache)]
        for token in continuation:
            steps.append(model(torch.tensor([[token]]), cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def write_qa_folder(folder, count=3):
    """`count` colour questions about `count` 32×32 pictures, as the `llava` eval task reads them -> the QA file."""
    import json

    records = [{"id": f"q{i}", "image": f"{i}.png", "category": "colour",
                "conversations": [{"from": "human", "value": "<image>\nwhat colour is it"},
                                  {"from": "gpt", "value": "red"}]} for i in range(count)]
    for i in range(count):
        picture(32, 32, i).save(folder / f"{i}.png")
    (folder / "qa.json").write_text(json.dumps(records))
    return folder / "qa.json"
