"""Activation checkpointing per decoder block: the same loss and gradients as without it (plain decoder, vision
experts, bidirectional image attention with padding, captured align states), the blocks really run twice, and
inference with a KV cache is untouched."""

import pytest
import torch

from monovlm.config import DecoderConfig, ProcessorConfig, VisionConfig, VLMConfig
from monovlm.data.layout import TokenLayout
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.model.align import HiddenCapture
from monovlm.model.vlm import IGNORE_INDEX, EncoderFreeVLM

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 97
IMAGE_ID = VOCAB - 1
VISION = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
EXPERTS = dict(expert_norms=True, expert_attention=True, expert_mlp=True)


def tiny_vlm(num_layers: int = 3, **decoder_overrides) -> EncoderFreeVLM:
    torch.manual_seed(0)
    decoder = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=4,
                            num_kv_heads=2, initializer_range=0.1, special_tokens={"image": IMAGE_ID},
                            **decoder_overrides)
    config = VLMConfig(decoder=decoder, vision=VISION, processor=ProcessorConfig(template="plain"))
    return EncoderFreeVLM(config)


def batch(rows: int = 2, text: int = 9) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """input_ids (B, T) of `text` tokens, one 16×24 image's placeholders, `text` tokens; labels on the text after
    the image; one image per row."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 16, 24, generator=generator) for _ in range(rows)]
    visual = TokenLayout.for_image(images[0], VISION).num_tokens
    before = torch.randint(0, IMAGE_ID, (rows, text), generator=generator)
    after = torch.randint(0, IMAGE_ID, (rows, text), generator=generator)
    input_ids = torch.cat([before, torch.full((rows, visual), IMAGE_ID), after], dim=1)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -text:] = after
    return input_ids, labels, images


def loss_and_grads(model: EncoderFreeVLM, checkpointing: bool, attention_mask=None):
    model.train()
    model.zero_grad(set_to_none=True)
    model.decoder.checkpoint_blocks = checkpointing
    input_ids, labels, images = batch()
    loss = model.loss(input_ids, labels, images, attention_mask=attention_mask)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("overrides", [{}, EXPERTS, dict(EXPERTS, image_attention="bidirectional")],
                         ids=["plain", "experts", "experts+bidirectional"])
def test_checkpointing_gives_the_same_loss_and_gradients(overrides):
    model = tiny_vlm(**overrides)
    attention_mask = None
    if "image_attention" in overrides:  # an explicit mask too: the first row left-padded by two tokens
        input_ids, _, _ = batch()
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0
    loss, grads = loss_and_grads(model, False, attention_mask)
    loss_ckpt, grads_ckpt = loss_and_grads(model, True, attention_mask)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ckpt.keys()
    assert len(grads) == sum(1 for _ in model.parameters())  # every parameter got a gradient
    if overrides:
        assert any("vision" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointed_blocks_run_again_in_the_backward():
    model = tiny_vlm()
    calls = []
    model.decoder.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    loss_and_grads(model, False)
    assert len(calls) == 1
    calls.clear()
    loss_and_grads(model, True)
    assert len(calls) == 2  # the forward, and its recompute during the backward
    calls.clear()
    with torch.no_grad():  # no gradients: nothing to save, so no checkpoint
        model(*batch()[:1], images=batch()[2])
    assert len(calls) == 1


def test_captured_align_states_keep_their_graph_under_checkpointing():
    model = tiny_vlm(**EXPERTS)
    input_ids, _, images = batch()
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.train()
        model.decoder.checkpoint_blocks = checkpointing
        with HiddenCapture(model.decoder, [1, 3]) as captured:
            model.hidden_states(input_ids, images)
        states = captured.states
        sum(state.pow(2).mean() for state in states).backward()
        results.append(([s.detach().clone() for s in states], model.embedder.patch_conv.weight.grad.clone()))
    (states, grad), (states_ckpt, grad_ckpt) = results
    for state, state_ckpt in zip(states, states_ckpt):
        torch.testing.assert_close(state_ckpt, state, rtol=0, atol=0)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-5, atol=1e-7)


def test_kv_cache_decoding_is_untouched_by_the_switch():
    """In training mode with gradients on, a forward with a KV cache never checkpoints: the cache is written once per
    step, and prefill + decode logits equal those without the switch; `generate` gives the same tokens."""
    model = tiny_vlm(**EXPERTS)
    input_ids, _, images = batch(rows=1)
    step = torch.tensor([[5]])
    outputs = []
    for checkpointing in (False, True):
        model.train()
        model.decoder.checkpoint_blocks = checkpointing
        cache = model.new_cache(1, input_ids.shape[1] + 4)
        prefill = model(input_ids, images, cache=cache, last_only=True)
        decode = model(step, cache=cache)
        assert cache.length == input_ids.shape[1] + 1
        model.eval()
        tokens = generate(model, input_ids, GenerationConfig(max_new_tokens=4), prefill_inputs={"images": images})
        outputs.append((prefill.detach(), decode.detach(), tokens[0].token_ids))
    (prefill, decode, tokens), (prefill_ckpt, decode_ckpt, tokens_ckpt) = outputs
    torch.testing.assert_close(prefill_ckpt, prefill, rtol=0, atol=0)
    torch.testing.assert_close(decode_ckpt, decode, rtol=0, atol=0)
    assert tokens_ckpt == tokens and len(tokens) > 0
