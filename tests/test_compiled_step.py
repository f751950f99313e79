"""The compiled training step (`compile = true`): the same loss, gradients and align states as the eager step, and
batches of other lengths reuse its graph."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from monovlm.data.collate import Batch
from monovlm.data.layout import TokenLayout
from monovlm.model.vlm import IGNORE_INDEX, EncoderFreeVLM
from monovlm.train.trainer import TrainModule
from test_checkpointing import EXPERTS, IMAGE_ID, VISION
from test_checkpointing import tiny_vlm as checkpointing_vlm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # inductor compiles


def tiny_vlm(**decoder_overrides) -> EncoderFreeVLM:
    return checkpointing_vlm(num_layers=2, **decoder_overrides).train()


def make_batch(text: int, seed: int) -> Batch:
    """Two rows: `text` tokens, one 16×24 image's placeholders, `text` labelled tokens; the second row is right-padded
    by two tokens, as the collate pads a shorter sample."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 16, 24, generator=generator) for _ in range(2)]
    visual = TokenLayout.for_image(images[0], VISION).num_tokens
    before = torch.randint(0, IMAGE_ID, (2, text), generator=generator)
    after = torch.randint(0, IMAGE_ID, (2, text), generator=generator)
    input_ids = torch.cat([before, torch.full((2, visual), IMAGE_ID), after], dim=1)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -text:] = after
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    input_ids[1, -2:] = 0
    labels[1, -2:] = IGNORE_INDEX
    return Batch(input_ids, labels, attention_mask, images, num_samples=2)


def step(module: TrainModule, batch: Batch, weights=None, depths=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, every parameter's gradient) of one forward and backward; the loss adds the captured states' mean, so
    their gradients are compared too."""
    module.zero_grad(set_to_none=True)
    forward = module.compiled_forward if module.compiled_loss is not None else module.eager_forward
    ce, states = forward(batch, weights, depths)
    loss = ce + sum(state.float().pow(2).mean() for state in states)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same(compiled, eager) -> None:
    (loss_c, grads_c), (loss_e, grads_e) = compiled, eager
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_step_equals_eager_and_other_lengths_reuse_the_graph():
    model = tiny_vlm()
    eager, compiled = TrainModule(model), TrainModule(model, compile=True)
    counters.clear()
    for text in (5, 9):  # two lengths: the second reuses the dynamic graph (at most one recompile allowed)
        batch = make_batch(text, seed=text)
        assert_same(step(compiled, batch), step(eager, batch))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


@pytest.mark.parametrize("switches", [EXPERTS, {"visual_position_step": 0.25},
                                      {"native_rope": True, "image_attention": "bidirectional"}],
                         ids=["experts", "v2pe", "native_rope"])
def test_compiled_step_with_switches_weights_and_align_states_equals_eager(switches):
    """Each decoder switch's positions, masks and routing reach the compiled region as they do the eager step."""
    model = tiny_vlm(**switches)
    eager, compiled = TrainModule(model), TrainModule(model, compile=True)
    batch = make_batch(6, seed=3)
    weights = torch.rand(batch.labels[:, 1:].shape, generator=torch.Generator().manual_seed(4))  # (B, T-1)
    depths = (0, -1, "final", 1)  # HiddenCapture's numbering, as the align loss asks for them
    assert_same(step(compiled, batch, weights, depths), step(eager, batch, weights, depths))


def test_forward_without_labels_runs_eagerly():
    model = tiny_vlm()
    batch = make_batch(4, seed=5)
    batch.labels.fill_(IGNORE_INDEX)
    ce, align = TrainModule(model, compile=True)(batch)
    assert float(ce.detach()) == 0.0 and float(align) == 0.0


def test_compiled_step_with_isolated_turns_equals_eager():
    """Isolated turns' mask and positions reach the compiled region as they do the eager step, and change the loss."""
    model = tiny_vlm()
    eager, compiled = TrainModule(model), TrainModule(model, compile=True)
    batch = make_batch(6, seed=6)
    plain = step(eager, batch)
    batch.turn_ids = torch.zeros_like(batch.input_ids)
    batch.turn_ids[:, -6:-3], batch.turn_ids[:, -3:] = 1, 2  # the text after the image as two turns
    batch.turn_ids[1, -2:] = 0  # the padding of the second row
    isolated = step(eager, batch)
    assert_same(step(compiled, batch, depths=(1,)), step(eager, batch, depths=(1,)))
    assert abs(float(isolated[0]) - float(plain[0])) > 1e-4
