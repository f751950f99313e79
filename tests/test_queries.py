"""BREEN's learnable queries (`[model.vision] query_grids`): the layout puts them after each image's grid, the
processor and the embedder agree on the count, they take the vision experts, token reduction keeps them, decoding is
exact (packed == unpacked, batched == one at a time, cached == full), and `[align] target = "queries"` aligns each
query set to the teacher's grid pooled to its side."""

import pytest
import torch

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.images import image_to_tensor, max_image_tokens, num_image_tokens
from monovlm.data.layout import TokenLayout
from monovlm.model.align import PatchAligner, query_alignment_loss, resample_grid, target_alignment_loss
from monovlm.model.vlm import EncoderFreeVLM
from tests.tiny_vlm import (
    assert_cached_equals_full,
    assert_packed_equals_unpacked,
    build_vlm,
    generate_batched_and_alone,
    picture,
    small_tokenizer,
)

GRIDS = [1, 2]  # 1 + 4 queries


def with_queries(model, processor, grids=GRIDS, seed=5):
    """The tiny VLM of tests/tiny_vlm.py rebuilt with learnable queries (same decoder weights, queries not zero)."""
    vision = VisionConfig(**{**model.config.vision.to_dict(), "query_grids": list(grids)})
    config = model.config
    config.vision = vision
    torch.manual_seed(seed)
    queried = EncoderFreeVLM(config).eval()
    queried.decoder.load_state_dict(model.decoder.state_dict())
    processor.vision = vision
    return queried, processor


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def test_the_queries_close_each_images_span_and_are_counted_everywhere():
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64,
                          query_grids=[1, 2, 4])
    assert vision.num_queries == 21
    layout = TokenLayout.of(4, 5, vision)  # CLS, 4 rows of 5 + SEP, 21 queries
    assert layout.num_tokens == 1 + 4 * 6 + 21 == num_image_tokens(32, 40, vision)
    assert layout.query_index.tolist() == list(range(25, 46))
    assert not layout.is_patch[layout.query_index].any() and int(layout.is_patch.sum()) == 20
    assert (layout.grid_row[layout.query_index] == -1).all()
    plain = VisionConfig(**{**vision.to_dict(), "query_grids": []})
    assert max_image_tokens(vision) == max_image_tokens(plain) + 21


@pytest.mark.parametrize("grids", [[0], [2, -1], "4"])
def test_bad_query_grids_are_refused(grids):
    with pytest.raises(ConfigError, match="query_grids"):
        VisionConfig(query_grids=grids)


@pytest.mark.parametrize("embedder", ["eve", "conv"])
def test_the_embedder_appends_the_same_learned_queries_to_every_image(tokenizer, embedder):
    model, processor = with_queries(*build_vlm(tokenizer, embedder=embedder, expert_mlp=True))
    images = [image_to_tensor(picture(16, 24, 1), processor.vision), image_to_tensor(picture(32, 32, 2), processor.vision)]
    tokens = model.embedder(images)
    for image, out in zip(images, tokens):
        layout = model.embedder.token_layout(image)
        assert out.shape[0] == layout.num_tokens
        assert torch.equal(out[layout.query_index], model.embedder.queries)
    ids, prompt_images = processor.prompt("what colour is it", [picture(16, 24, 1)])
    assert sum(1 for t in ids if t == model.image_token_id) == model.embedder.token_layout(prompt_images[0]).num_tokens


def test_the_queries_take_the_vision_experts_and_read_the_image(tokenizer):
    model, processor = with_queries(*build_vlm(tokenizer, expert_mlp=True))
    ids, images = processor.prompt("what colour is it", [picture(16, 24, 1)])
    ids = torch.tensor([ids])
    layout = model.embedder.token_layout(images[0])
    queries = (ids[0] == model.image_token_id).nonzero().squeeze(1)[layout.query_index]  # (K,) positions
    with torch.no_grad():
        base = model.hidden_states(ids, images)
        other = model.hidden_states(ids, [image_to_tensor(picture(16, 24, 9), processor.vision)])
        for block in model.decoder.layers:  # the vision expert's FFN changes only visual tokens (queries included)
            block.vision_mlp.down_proj.weight.mul_(2.0)
        doubled = model.hidden_states(ids, images)
    first_query, first_visual = int(queries[0]), int(queries[0]) - layout.num_tokens + layout.num_queries
    assert (base[0, first_query] - other[0, first_query]).abs().max() > 1e-4  # a query sees its image
    assert torch.equal(doubled[0, :first_visual], base[0, :first_visual])  # text before the image: untouched
    assert (doubled[0, queries] - base[0, queries]).abs().max() > 1e-4


def test_packed_logits_and_loss_equal_unpacked(tokenizer):
    assert_packed_equals_unpacked(*with_queries(*build_vlm(tokenizer, expert_mlp=True)))


def test_batched_generation_equals_one_at_a_time(tokenizer):
    generate_batched_and_alone(*with_queries(*build_vlm(tokenizer, expert_mlp=True)))


def test_cached_prefill_and_decode_equal_the_full_forward(tokenizer):
    assert_cached_equals_full(*with_queries(*build_vlm(tokenizer, expert_mlp=True)))


def test_token_reduction_never_drops_a_query(tokenizer):
    model, processor = with_queries(*build_vlm(tokenizer))
    ids, images = processor.prompt("what colour is it", [picture(32, 32, 2)])
    layout = model.visual_layout(torch.tensor([ids]), images)
    queries = model.embedder.token_layout(images[0]).query_index
    visual = (torch.tensor(ids) == model.image_token_id).nonzero().squeeze(1)
    assert not layout.patch_mask[0, visual[queries]].any()
    assert int(layout.patch_mask.sum()) == layout.grids[0][0] * layout.grids[0][1]


# -------------------------------------------------------------------------------------------------------------------
# the align loss on the queries


def test_each_query_set_is_aligned_to_the_teacher_pooled_to_its_grid():
    """An identity head: the loss is 0 exactly when every query's state equals its pooled teacher feature; grid
    tokens and other depths do not enter it."""
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, max_pixels=64 * 64, use_cls=True,
                          query_grids=[1, 2])
    layouts = [TokenLayout.of(4, 4, vision), TokenLayout.of(2, 4, vision)]
    width = 8
    aligner = PatchAligner(width, width, num_layers=1)
    with torch.no_grad():
        aligner.input_layer.weight.copy_(torch.eye(width))
        aligner.input_layer.bias.zero_()
    teacher = [torch.randn(8, 8, width, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    lengths = [layout.num_tokens for layout in layouts]
    vision_mask = torch.zeros(2, 3 + max(lengths), dtype=torch.bool)  # one image per row, after 3 text tokens
    for row, count in enumerate(lengths):
        vision_mask[row, 3 : 3 + count] = True
    states = torch.randn(2, vision_mask.shape[1], width)
    for row, (layout, feats) in enumerate(zip(layouts, teacher)):
        targets = torch.cat([resample_grid(feats, side, side).reshape(side * side, width) for side in (1, 2)])
        states[row, 3 + layout.query_index] = targets
    assert query_alignment_loss(aligner, [states], vision_mask, layouts, teacher, [1, 2]).item() <= 1e-6
    assert torch.allclose(states[0, 3 + layouts[0].num_tokens - 5], teacher[0].mean(dim=(0, 1)), atol=1e-6)
    moved = states.clone()
    moved[0, 3 + layouts[0].patch_index] += 1.0  # grid tokens: not aligned here
    assert query_alignment_loss(aligner, [moved], vision_mask, layouts, teacher, [1, 2]).item() <= 1e-6
    moved[1, 3 + layouts[1].query_index[2]] *= -1.0  # one 2×2 query of the second image
    assert query_alignment_loss(aligner, [moved], vision_mask, layouts, teacher, [1, 2]).item() > 0.05
    assert target_alignment_loss("queries", aligner, [moved], vision_mask, layouts, teacher, [1, 2]) == \
        query_alignment_loss(aligner, [moved], vision_mask, layouts, teacher, [1, 2])
    with pytest.raises(ValueError, match="need 21 queries"):
        query_alignment_loss(aligner, [states], vision_mask, layouts, teacher, [1, 2, 4])


def test_a_queries_target_without_queries_is_refused_before_training(tmp_path, capsys):
    from tests.test_recipes import train_args, write_user_folder
    from monovlm.cli import main

    data = write_user_folder(tmp_path / "mine")
    assert main(train_args("breen", data, tmp_path / "run", ["model.vision.query_grids=[]"])) == 2
    assert "needs learnable queries: set [model.vision] query_grids" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
