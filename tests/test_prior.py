"""PRIOR-style loss weighting (`loss_weighting = "prior"`): weights follow 1 - p(token | blank image), mean 1 over
the labelled tokens, none elsewhere; power 0 is the plain loss; a stage trains with it."""

import pytest
import torch
import torch.nn.functional as F

from monovlm.config import DecoderConfig, VisionConfig, VLMConfig
from monovlm.data.collate import collate
from monovlm.data.processor import Processor
from monovlm.model.decoder import Decoder
from monovlm.model.vlm import IGNORE_INDEX, EncoderFreeVLM
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.prior import prior_token_weights


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_bpe_tokenizer(["red circle blue square what colour is it green two yes no"] * 20, vocab_size=300)
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, num_kv_heads=1, initializer_range=0.3))
    add_image_special_tokens(tokenizer, decoder)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
    model = EncoderFreeVLM(VLMConfig(decoder=decoder.config, vision=vision)).eval()
    model.decoder.load_state_dict(decoder.state_dict())
    processor = Processor(tokenizer, vision, model.config.processor)
    samples = [processor.process({"conversations": [{"from": "human", "value": "<image>\nwhat colour is it"},
                                                    {"from": "gpt", "value": answer}]},
                                 images=[_picture(seed)]) for seed, answer in enumerate(["red circle", "two", "yes"])]
    return model, collate(samples, pad_id=0)


def _picture(seed):
    from PIL import Image

    pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def test_weights_follow_what_a_blank_image_leaves_unpredicted(setup):
    model, batch = setup
    weights = prior_token_weights(model, batch.input_ids, batch.labels, batch.images, batch.attention_mask, 1.0)
    selected = batch.labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(weights[~selected], torch.zeros_like(weights[~selected]))
    assert weights[selected].mean().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # the same blind probabilities, by hand
        blank = [torch.zeros_like(image) for image in batch.images]
        logits = model(batch.input_ids, blank, attention_mask=batch.attention_mask)[:, :-1][selected].float()
        blind = F.softmax(logits, dim=-1).gather(1, batch.labels[:, 1:][selected][:, None]).squeeze(1)
    expected = (1 - blind) / (1 - blind).mean()
    assert torch.allclose(weights[selected], expected, atol=1e-5)
    # a tiny random model is unsure of every token; a large power makes its small differences count
    sharp = prior_token_weights(model, batch.input_ids, batch.labels, batch.images, batch.attention_mask, 300.0)
    expected = (1 - blind) ** 300 / ((1 - blind) ** 300).mean()
    assert torch.allclose(sharp[selected], expected, rtol=1e-3) and expected.std() > 0.1
    assert int(sharp[selected].argmin()) == int(blind.argmax())  # the best-predicted token weighs least
    flat = prior_token_weights(model, batch.input_ids, batch.labels, batch.images, batch.attention_mask, 0.0)
    assert torch.allclose(flat[selected], torch.ones_like(flat[selected]))

