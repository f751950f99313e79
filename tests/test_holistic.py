"""HoVLE's holistic embedding (the pre-buffer trained by distillation): the text distillation loss, its place in the
training step (the pre-buffer's output vs. the LLM's own embeddings), and stages without the next-token loss
(`lm_weight = 0`, also BREEN's pre-alignment)."""

import pytest
import torch

from monovlm.cli import main
from monovlm.config import ConfigError
from monovlm.data.collate import collate
from monovlm.model.align import text_distillation_loss
from monovlm.train.trainer import TrainModule
from tests.test_recipes import train_args, write_user_folder
from tests.tiny_vlm import (
    assert_packed_equals_unpacked,
    build_vlm,
    conversation,
    generate_batched_and_alone,
    picture,
    small_tokenizer,
)


def test_text_distillation_is_one_minus_cosine_over_text_tokens_only():
    embeddings = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    text = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 0: image or padding
    states = 3.0 * embeddings  # cosine: scale does not count
    states[~text] = torch.randn(int((~text).sum()), 8)
    assert text_distillation_loss(states, embeddings, text).item() <= 1e-6
    states[0, 4] = -states[0, 4]  # one of 9 text tokens points the other way: 1 - cos = 2
    assert text_distillation_loss(states, embeddings, text).item() == pytest.approx(2 / 9, abs=1e-6)
    nothing = text_distillation_loss(states.requires_grad_(), embeddings, torch.zeros_like(text))
    assert nothing.item() == 0.0 and nothing.requires_grad


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def test_a_vlm_with_a_holistic_embedding_decodes_exactly(tokenizer):
    """Images through the holistic embedding (a pre-buffer of 2 of 4 layers): packed == unpacked, left-padded batched
    generation (cached) == one at a time."""
    model, processor = build_vlm(tokenizer, num_layers=4, pre_buffer_layers=2)
    assert_packed_equals_unpacked(model, processor)
    generate_batched_and_alone(model, processor)


def test_the_step_distils_the_pre_buffers_output_towards_the_text_embeddings(tokenizer):
    model, processor = build_vlm(tokenizer, num_layers=3, pre_buffer_layers=1)  # layer 0: the holistic embedding
    with torch.no_grad():  # an identity layer: o_proj and down_proj zero
        model.decoder.layers[0].attn.o_proj.weight.zero_()
        model.decoder.layers[0].mlp.down_proj.weight.zero_()
    samples = [processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, 1)]),
               processor.process(conversation("how many shapes", "two", with_image=False))]
    batch = collate(samples, pad_id=0)
    module = TrainModule(model)
    ce, plain = module(batch)
    ce_distil, at_identity = module(batch, text_distill=2.0)
    assert plain.item() == 0.0 and at_identity.item() <= 1e-6 and torch.equal(ce, ce_distil)
    with torch.no_grad():
        model.decoder.layers[0].mlp.down_proj.weight.normal_(0, 0.5)
    _, moved = module(batch, text_distill=2.0)
    with torch.no_grad():  # by hand: the state after layer 0 at text tokens vs. the token embeddings
        from monovlm.model.align import HiddenCapture

        with HiddenCapture(model.decoder, [1]) as captured:
            model.hidden_states(batch.input_ids, batch.images, batch.attention_mask)
        text = (batch.input_ids != model.image_token_id) & (batch.attention_mask != 0)
        expected = text_distillation_loss(captured.states[0], model.decoder.embed_tokens(batch.input_ids), text)
    assert moved.item() == pytest.approx(2.0 * expected.item(), rel=1e-5) and moved.item() > 0.01
    moved.backward()
    assert model.decoder.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.decoder.layers[2].mlp.down_proj.weight.grad is None  # later layers do not reach layer 0's output


@pytest.mark.parametrize("values,message", [
    ({"lm_weight": 0.0}, "lm_weight = 0 leaves no loss"),
    ({"lm_weight": -1.0}, "must be >= 0"),
    ({"text_distill": -0.5}, "must be >= 0"),
])
def test_stage_loss_weights_are_checked(values, message):
    from monovlm.train.recipe import StageConfig

    with pytest.raises(ConfigError, match=message):
        StageConfig(name="s", data="captions.json", **values)


def test_text_distillation_without_a_pre_buffer_is_refused(tmp_path, capsys):
    data = write_user_folder(tmp_path / "mine")
    assert main(train_args("hovle", data, tmp_path / "run", ["model.decoder.pre_buffer_layers=0",
                                                              "model.decoder.num_layers=2", "align.layers=[1]"])) == 2
    assert "text_distill needs a pre-buffer" in capsys.readouterr().err


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_the_step_weighs_the_next_token_loss_by_lm_weight(tokenizer, tmp_path, lm_weight):
    """Trainer.forward_backward's gradients equal those of lm_weight · (mean token loss) + text distillation: with
    lm_weight = 0 the next-token loss is logged but sends no gradient."""
    from monovlm.train.recipe import Recipe, StageConfig
    from monovlm.train.trainer import Trainer, TrainOptions

    model, processor = build_vlm(tokenizer, num_layers=3, pre_buffer_layers=1)
    model.train()
    samples = [processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, 1)]),
               processor.process(conversation("how many shapes", "two", with_image=False))]
    batch = collate(samples, pad_id=0)
    stage = StageConfig(name="distill", data="captions.json", train=["embedder", "pre_buffer", "decoder"],
                        lm_weight=lm_weight, text_distill=1.5)
    module = TrainModule(model)
    trainer = Trainer(TrainOptions(recipe=Recipe(name="t", stages=[stage]), data_root=tmp_path, run_dir=tmp_path,
                                   dtype="float32", measure_peak=False))
    losses = trainer.forward_backward(module, model, [batch], stage)
    from_step = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ce_sum, distil = module(batch, text_distill=1.5)
    labelled = int((batch.labels[:, 1:] != -100).sum())
    (lm_weight * ce_sum / labelled + distil).backward()
    by_hand = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert losses.ce == pytest.approx(ce_sum.item() / labelled, rel=1e-6) and losses.ce > 0
    assert losses.align == pytest.approx(distil.item(), rel=1e-6)
    assert from_step.keys() == by_hand.keys()
    for name, grad in by_hand.items():
        torch.testing.assert_close(from_step[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    head = "decoder.embed_tokens.weight" if model.decoder.lm_head is None else "decoder.lm_head.weight"
    unused = torch.ones(model.decoder.config.vocab_size, dtype=torch.bool)
    unused[batch.input_ids.unique()] = False  # rows of tokens not in the batch: only the output head reads them
    assert (from_step[head][unused].abs().sum().item() == 0.0) == (lm_weight == 0.0)
