"""V2PE (`visual_position_step`): visual tokens advance the RoPE position by a fraction. Positions by hand, cached ==
full forward with left padding, packed == unpacked, batched generation == one at a time, text-only inputs unchanged,
HF-initialised recipes may set it, and what cannot honour it says so."""

import pytest
import torch

from monovlm.config import ConfigError, DecoderConfig
from monovlm.infer.compiled import supports_static_decode
from monovlm.infer.generate import GenerationConfig, generate, left_pad
from monovlm.infer.reduction import build_reduction
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import position_ids_from_segments
from tiny_vlm import (
    assert_packed_equals_unpacked,
    build_vlm,
    generate_batched_and_alone,
    picture,
    small_tokenizer,
    write_qa_folder,
)

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
    return small_tokenizer()


def test_packed_logits_and_loss_equal_unpacked(tokenizer):
    assert_packed_equals_unpacked(*build_vlm(tokenizer, visual_position_step=STEP))


def test_batched_generation_equals_one_at_a_time_and_compile_falls_back_to_the_eager_step(tokenizer):
    model, processor = build_vlm(tokenizer, visual_position_step=STEP)
    _, batched, rows, images = generate_batched_and_alone(model, processor)
    assert not supports_static_decode(model, model.new_cache(1, 8))  # float positions: no static RoPE lookup
    compiled = generate(model, rows, GenerationConfig(max_new_tokens=6, compile=True), prefill_inputs={"images": images})
    assert [g.token_ids for g in compiled] == [g.token_ids for g in batched]


def test_text_only_inputs_are_unchanged_and_images_move_what_follows(tokenizer):
    stepped, processor = build_vlm(tokenizer, visual_position_step=STEP)
    whole, _ = build_vlm(tokenizer, visual_position_step=1.0)
    whole.load_state_dict(stepped.state_dict())
    text = torch.tensor([processor.prompt("how many shapes")[0]])
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 5)])
    with torch.no_grad():
        assert torch.equal(stepped(text), whole(text))  # no visual tokens: the integer positions, bitwise
        difference = (stepped(torch.tensor([ids]), images)[0, -1] - whole(torch.tensor([ids]), images)[0, -1])
    assert difference.abs().max().item() > 1e-3


def test_renumbered_reduction_is_refused(tokenizer):
    model, processor = build_vlm(tokenizer, visual_position_step=STEP)
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 6)])
    with pytest.raises(ValueError, match="renumber.*visual_position_step"):
        model(torch.tensor([ids]), images, reduction=build_reduction("fastv", keep=0.5, positions="renumber", layer=1))


def test_the_step_is_set_at_inference_and_eval_runs_each_step(tokenizer, tmp_path):
    """`set_visual_position_step` makes a model trained at one step compute exactly what one built at another
    computes; `monovlm eval --visual-position-step` adds one run per step."""
    from monovlm.eval.run import run_eval

    whole, processor = build_vlm(tokenizer, visual_position_step=1.0)
    stepped, _ = build_vlm(tokenizer, visual_position_step=STEP)
    stepped.load_state_dict(whole.state_dict())
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 5)])
    ids = torch.tensor([ids])
    with torch.no_grad():
        before = whole(ids, images)
        whole.set_visual_position_step(STEP)
        assert torch.equal(whole(ids, images), stepped(ids, images))
        assert (whole(ids, images) - before).abs().max().item() > 1e-3
    with pytest.raises(ConfigError, match="visual_position_step"):
        whole.set_visual_position_step(1.5)
    assert whole.config.decoder.visual_position_step == STEP  # a refused step changes nothing
    whole.set_visual_position_step(1.0)
    whole.save(tmp_path / "model", tokenizer)
    qa = write_qa_folder(tmp_path)
    runs = run_eval(tmp_path / "model", ["llava"], data=qa, out=tmp_path / "report", blind=False,
                    progress=False, position_steps=[0.5, 0.25])
    assert [run.setting for run in runs] == [{}, {"visual_position_step": 0.5}, {"visual_position_step": 0.25}]
    with pytest.raises(ValueError, match="V2PE's step"):
        run_eval(tmp_path / "model", ["llava"], data=qa, position_steps=[0.0])


def test_training_with_varied_steps_runs_each_micro_batch_at_its_drawn_step(tokenizer, tmp_path):
    """A stage's `position_steps`: the step's gradients are those of the model at the drawn step (a model built at
    that step, same weights), the model's own step is back afterwards, and the draw depends on (seed, step,
    micro-batch) alone."""
    from monovlm.data.collate import collate
    from monovlm.train.recipe import Recipe, StageConfig
    from monovlm.train.trainer import TrainModule, Trainer, TrainOptions, drawn_position_step
    from tiny_vlm import conversation

    def gradients(model, stage):
        trainer = Trainer(TrainOptions(recipe=Recipe(name="t", stages=[stage]), data_root=tmp_path, run_dir=tmp_path,
                                       dtype="float32", measure_peak=False))
        model.zero_grad(set_to_none=True)
        losses = trainer.forward_backward(TrainModule(model), model, [batch], stage, global_step=3)
        return losses.ce, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, processor = build_vlm(tokenizer, visual_position_step=1.0)
    stepped, _ = build_vlm(tokenizer, visual_position_step=STEP)
    stepped.load_state_dict(whole.state_dict())
    batch = collate([processor.process(conversation("what colour is it", "red"), images=[picture(16, 24, 1)]),
                     processor.process(conversation("how many shapes", "two"), images=[picture(24, 16, 2)])], pad_id=0)
    varied = StageConfig(name="s", data="instruct.json", position_steps=[STEP])
    ce_varied, grads_varied = gradients(whole.train(), varied)
    ce_stepped, grads_stepped = gradients(stepped.train(), StageConfig(name="s", data="instruct.json"))
    ce_whole, _ = gradients(whole, StageConfig(name="s", data="instruct.json"))
    assert whole.config.decoder.visual_position_step == 1.0  # restored after the step
    assert ce_varied == pytest.approx(ce_stepped, rel=1e-6) and abs(ce_whole - ce_varied) > 1e-5
    for name, grad in grads_stepped.items():
        torch.testing.assert_close(grads_varied[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    steps = [1.0, 0.5, 0.25, 0.125]
    draws = [drawn_position_step(steps, 0, step, index) for step in range(40) for index in range(2)]
    assert draws == [drawn_position_step(steps, 0, step, index) for step in range(40) for index in range(2)]
    assert set(draws) == set(steps)
    with pytest.raises(ConfigError, match="position_steps"):
        StageConfig(name="s", data="instruct.json", position_steps=[0.5, 2.0])
