"""TokenFLEX (`[model.vision] token_pool`, a stage's `token_pools`): each image's token grid average-pooled by a
factor, the processor counting the pooled layout and the model reading each image's factor back from its
placeholders — so one batch may mix budgets. Exactness as for the other switches (packed == unpacked, batched ==
one at a time, cached == full), images of mixed budgets equal to each alone, and the draw is per image and seed."""

import pytest
import torch
import torch.nn.functional as F

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.images import image_to_tensor, num_image_tokens
from monovlm.data.layout import TokenLayout, pooled_grid
from monovlm.data.processor import Processor
from monovlm.train.recipe import StageConfig
from tests.tiny_vlm import (
    assert_cached_equals_full,
    assert_packed_equals_unpacked,
    build_vlm,
    conversation,
    generate_batched_and_alone,
    picture,
    small_tokenizer,
    write_qa_folder,
)


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def pooled(model, processor, pool=2):
    model.set_token_pool(pool)
    assert processor.vision is model.config.vision  # the processor counts what the model embeds
    return model, processor


def test_pooled_layouts_are_counted_alike_everywhere():
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, max_pixels=64 * 64, token_pool=2)
    assert pooled_grid(5, 4, 2) == (3, 2) and pooled_grid(8, 8, 3) == (3, 3)
    assert num_image_tokens(64, 64, vision) == 1 + 4 * 5 == TokenLayout.for_image(torch.zeros(3, 64, 64), vision).num_tokens
    assert num_image_tokens(64, 64, vision, pool=1) == 1 + 8 * 9
    with pytest.raises(ConfigError, match="token_pool"):
        VisionConfig(token_pool=0)
    with pytest.raises(ConfigError, match="token_pools"):
        StageConfig(name="s", data="instruct.json", token_pools=[1, 0])


def test_the_pooled_grid_is_the_average_of_the_full_grids_windows(tokenizer):
    model, processor = build_vlm(tokenizer, embedder="conv")
    image = image_to_tensor(picture(32, 48, 1), processor.vision)  # a 4 × 6 grid
    full, = model.embedder([image], [1])
    half, = model.embedder([image], [2])
    layout_full, layout_half = model.embedder.token_layout(image, 1), model.embedder.token_layout(image, 2)
    grid = full[layout_full.patch_index].view(4, 6, -1)  # conv: the grid tokens are the conv's output as they are
    expected = F.avg_pool2d(grid.permute(2, 0, 1), 2).permute(1, 2, 0).reshape(6, -1)
    torch.testing.assert_close(half[layout_half.patch_index], expected)
    assert (layout_half.rows, layout_half.cols) == (2, 3)


def test_images_of_mixed_budgets_in_one_batch_equal_each_alone(tokenizer):
    model, processor = build_vlm(tokenizer)
    images = [picture(32, 32, 2), picture(32, 48, 3)]
    samples = []
    for image, pool in zip(images, (1, 2)):
        image.info["token_pool"] = pool
        samples.append(processor.process(conversation("what colour is it", "red"), images=[image]))
    from monovlm.data.collate import collate

    batch = collate(samples, pad_id=0)
    assert model.image_pools(batch.input_ids == model.image_token_id, batch.images) == [1, 2]
    with torch.no_grad():
        together = model(batch.input_ids, batch.images, attention_mask=batch.attention_mask)
        for row, sample in enumerate(samples):
            alone = model(torch.tensor([sample.input_ids]), sample.images)[0]
            assert (together[row, : len(sample)] - alone).abs().max().item() <= 1e-5
    layouts = model.image_layouts(batch.input_ids, batch.images)  # what the align loss and reduction read
    assert [(layout.rows, layout.cols) for layout in layouts] == [(4, 4), (2, 3)]


def test_packed_logits_and_loss_equal_unpacked(tokenizer):
    assert_packed_equals_unpacked(*pooled(*build_vlm(tokenizer)))


def test_batched_generation_equals_one_at_a_time(tokenizer):
    generate_batched_and_alone(*pooled(*build_vlm(tokenizer, expert_mlp=True)))


def test_cached_prefill_and_decode_equal_the_full_forward(tokenizer):
    assert_cached_equals_full(*pooled(*build_vlm(tokenizer)), size=(24, 40))


def test_token_reduction_sees_the_pooled_grid(tokenizer):
    from monovlm.infer.reduction import build_reduction

    model, processor = pooled(*build_vlm(tokenizer))
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 2)])
    layout = model.visual_layout(torch.tensor([ids]), images)
    assert layout.grids == [(2, 2)] and int(layout.patch_mask.sum()) == 4
    with torch.no_grad():
        kept_all = model(torch.tensor([ids]), images, reduction=build_reduction("fastv", keep=1.0, layer=1))
        plain = model(torch.tensor([ids]), images)
    assert (kept_all[0, -1] - plain[0, -1]).abs().max().item() <= 1e-5


def test_training_draws_each_images_pool_by_its_path_and_seed(tokenizer, tmp_path):
    model, _ = build_vlm(tokenizer)
    vision = model.config.vision
    draws = {seed: [Processor(tokenizer, vision, token_pools=[1, 2], pool_seed=seed).image_pool(f"images/{i}.png")
                    for i in range(40)] for seed in (0, 1)}
    assert set(draws[0]) == {1, 2} and draws[0] != draws[1]
    assert draws[0] == [Processor(tokenizer, vision, token_pools=[1, 2], pool_seed=0).image_pool(f"images/{i}.png")
                        for i in range(40)]
    for i in range(4):
        picture(32, 32, i).save(tmp_path / f"{i}.png")
    processor = Processor(tokenizer, vision, token_pools=[1, 2], pool_seed=0)
    for i in range(4):
        record = {"image": f"{i}.png", **conversation("what colour is it", "red")}
        sample = processor.process(record, image_root=tmp_path)
        count = sum(1 for t in sample.input_ids if t == model.image_token_id)
        assert count == num_image_tokens(32, 32, vision, processor.image_pool(f"{i}.png"))


def test_eval_runs_each_pool(tokenizer, tmp_path):
    from monovlm.eval.run import run_eval

    model, _ = build_vlm(tokenizer)
    model.save(tmp_path / "model", tokenizer)
    qa = write_qa_folder(tmp_path)
    runs = run_eval(tmp_path / "model", ["llava"], data=qa, out=tmp_path / "report", blind=False,
                    progress=False, token_pools=[2, 4])
    assert [run.setting for run in runs] == [{}, {"token_pool": 2}, {"token_pool": 4}]
    with pytest.raises(ValueError, match="pooling factor"):
        run_eval(tmp_path / "model", ["llava"], data=qa, token_pools=[0])
