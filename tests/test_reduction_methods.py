"""Each token-reduction method's own rule: checked against an independent computation (eager attention on a tiny
model) or on hand-made scores and features with a known answer."""

from types import SimpleNamespace

import pytest
import torch

from monovlm.model.decoder import LayerInputs
from monovlm.config import DecoderConfig, VisionConfig, VLMConfig
from monovlm.infer.reduction import build_reduction
from monovlm.infer.reduction.base import ImageView, ReductionContext, budget
from monovlm.infer.reduction.divprune import max_min_diverse
from monovlm.infer.reduction.fourier import low_pass_resample
from monovlm.infer.reduction.hiprune import grid_neighbours
from monovlm.infer.reduction.tome import bipartite_merge
from monovlm.infer.reduction.uniform_grid import lattice_lines, lattice_shape
from monovlm.infer.reduction.vision_drop import contextual_merge
from monovlm.model.rope import apply_rotary
from monovlm.model.vlm import EncoderFreeVLM

IMAGE, START, END = 3, 4, 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                           num_kv_heads=2, initializer_range=0.1,
                           special_tokens={"image": IMAGE, "image_start": START, "image_end": END})
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)
    return EncoderFreeVLM(VLMConfig(decoder=config, vision=vision)).eval()


def prompt(model):
    """One row, two images (6×5 and 4×6 grids, CLS and row separators), text around them."""
    images = [torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1,
              torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1]
    ids = [7, 8]
    for image in images:
        ids += [START] + [IMAGE] * model.embedder.token_layout(image).is_patch.numel() + [END] + [9]
    return torch.tensor([ids + [10, 11]]), images


def kept_patches(reduction, layout, stage=0):
    """{image: set of original indices of its kept patches} at a stage of the last forward."""
    kept = set(reduction.last_trace.stages[stage].kept[0].tolist())
    result = {}
    for image in range(len(layout.grids)):
        patches = (layout.patch_mask[0] & (layout.image_index[0] == image)).nonzero().squeeze(1).tolist()
        result[image] = {p for p in patches if p in kept}
    return result


def eager_attention(model, input_ids, images, layer):
    """Head-averaged attention probabilities (T, T) of `layer`, from a plain layer loop and the fused projection."""
    decoder = model.decoder
    x, _ = model.embed(input_ids, images)
    cos, sin = decoder.rotary(torch.arange(input_ids.shape[1])[None], x.dtype)
    for block in decoder.layers[:layer]:
        x = block(x, LayerInputs(cos, sin, None, True, None))
    block = decoder.layers[layer]
    qkv = block.attn.project(block.attn_norm(x)).transpose(1, 2)  # (1, H + 2Hkv, T, D)
    q, k = apply_rotary(qkv[:, :4], cos, sin), apply_rotary(qkv[:, 4:6], cos, sin).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=1)[0]


def top_patches(layout, scores, keep):
    result = {}
    for image, (rows, cols) in enumerate(layout.grids):
        patches = (layout.patch_mask[0] & (layout.image_index[0] == image)).nonzero().squeeze(1)
        top = scores[patches].topk(budget(rows * cols, keep)).indices
        result[image] = set(patches[top].tolist())
    return result


def full_image(index: int, rows: int, cols: int, offset: int = 10) -> ImageView:
    patches = torch.arange(rows * cols) + offset
    return ImageView(index, 0, rows, cols, patches, torch.arange(rows).repeat_interleave(cols),
                     torch.arange(cols).repeat(rows), patches.clone())


def test_fastv_keeps_the_patches_the_last_token_attends_most_in_layer_k_minus_1(model):
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    reduction = build_reduction("fastv", keep=0.4, layer=2)
    with torch.no_grad():
        model(input_ids, images, reduction=reduction)
        attention = eager_attention(model, input_ids, images, layer=1)[-1]  # the last token's row in layer K-1
        wrong_layer = eager_attention(model, input_ids, images, layer=2)[-1]
    assert reduction.last_trace.stages[0].layer == 2
    assert kept_patches(reduction, layout) == top_patches(layout, attention, 0.4)
    assert top_patches(layout, attention, 0.4) != top_patches(layout, wrong_layer, 0.4)  # the layer matters


def test_pyramid_drop_stages_follow_the_schedule_and_nest(model):
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    reduction = build_reduction("pyramiddrop", keep=0.5)  # stages at layers 1, 2, 3 with ratios 1/2, 1/4, 1/8
    with torch.no_grad():
        model(input_ids, images, reduction=reduction)
        first_stage = eager_attention(model, input_ids, images, layer=1)[-1]
    stages = reduction.last_trace.stages
    assert [s.layer for s in stages] == [1, 2, 3]
    per_stage = [kept_patches(reduction, layout, s) for s in range(3)]
    for stage, ratio in enumerate([0.5, 0.25, 0.125]):
        for image, (rows, cols) in enumerate(layout.grids):
            assert len(per_stage[stage][image]) == budget(rows * cols, ratio)
            if stage:
                assert per_stage[stage][image] <= per_stage[stage - 1][image]
    assert per_stage[0] == top_patches(layout, first_stage, 0.5)
    custom = build_reduction("pyramiddrop", keep=0.5, layers=[2], ratios=[0.3])
    with torch.no_grad():
        model(input_ids, images, reduction=custom)
    assert [s.layer for s in custom.last_trace.stages] == [2]
    with pytest.raises(ValueError, match="1 layers but 2 ratios"):
        build_reduction("pyramiddrop", layers=[1], ratios=[0.5, 0.2])


def test_uniform_grid_keeps_a_regular_lattice(model):
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    reduction = build_reduction("uniform", keep=0.3)
    with torch.no_grad():
        model(input_ids, images, reduction=reduction)
    kept = kept_patches(reduction, layout)
    coordinates = {(int(layout.grid_row[0, p]), int(layout.grid_col[0, p])) for p in kept[0]}
    # 6×5 grid, budget round(0.3·30) = 9 -> a 3×3 lattice at the centres of equal bins
    assert lattice_shape(6, 5, 9) == (3, 3)
    assert coordinates == {(r, c) for r in (1, 3, 5) for c in (0, 2, 4)}
    assert lattice_lines(8, 4).tolist() == [1, 3, 5, 7]


def test_random_is_seeded_and_keeps_the_budget(model):
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    picks = []
    for seed in (0, 0, 1):
        reduction = build_reduction("random", keep=0.3, seed=seed)
        with torch.no_grad():
            model(input_ids, images, reduction=reduction)
        picks.append(kept_patches(reduction, layout))
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert [len(picks[0][i]) for i in (0, 1)] == [9, 7]  # round(0.3·30), round(0.3·24)


def test_fourier_resamples_the_low_frequencies_onto_a_lattice(model):
    n, m = 6, 3
    resample = low_pass_resample(n, m)
    assert torch.allclose(resample @ torch.full((n,), 2.5, dtype=torch.float64), torch.full((m,), 2.5,
                                                                                            dtype=torch.float64))
    assert torch.allclose(low_pass_resample(5, 5), torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(resample @ resample.T, torch.eye(m, dtype=torch.float64) * m / n, atol=1e-12)
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    reduction = build_reduction("fourier", keep=0.3)
    with torch.no_grad():
        model(input_ids, images, reduction=reduction)
    choice = reduction.last_trace.stages[0].choices[0]  # the 6×5 image -> 3×3
    assert torch.allclose(choice.mix.double(), torch.kron(low_pass_resample(6, 3), low_pass_resample(5, 3)), atol=1e-6)
    assert {(int(layout.grid_row[0, p]), int(layout.grid_col[0, p])) for p in choice.keep.tolist()} == {
        (r, c) for r in (1, 3, 5) for c in (0, 2, 4)}


def test_divprune_picks_one_token_per_cluster_starting_from_the_most_isolated():
    directions = torch.eye(4)[:3]  # three orthogonal directions
    features = torch.cat([directions[0] + 0.01 * torch.randn(5, 4), directions[1] + 0.01 * torch.randn(4, 4),
                          directions[2][None]])  # cluster sizes 5, 4, 1: the single one is the most isolated
    picked = max_min_diverse(features, 3)
    assert picked[0].item() == 9
    assert {0 if i < 5 else 1 if i < 9 else 2 for i in picked.tolist()} == {0, 1, 2}


def test_tome_merges_the_most_similar_pairs_with_size_weights():
    base = torch.randn(3, 8)
    metric = base.repeat_interleave(2, dim=0)  # tokens 2i and 2i+1 identical: A token 2i matches B token 2i+1
    metric[1::2] += 1e-3 * torch.randn(3, 8)
    kept, weights = bipartite_merge(metric, 3)
    assert kept.tolist() == [1, 3, 5]
    expected = torch.zeros(3, 6)
    expected[[0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5]] = 0.5
    assert torch.allclose(weights, expected)
    kept, weights = bipartite_merge(torch.randn(20, 8), 4)  # several rounds
    assert kept.numel() == 4 and torch.allclose(weights.sum(dim=1), torch.ones(4))
    assert bool((weights > 0).sum(dim=0).eq(1).all())  # every token ends up in exactly one merged token


def test_visiondrop_merges_the_rest_into_strided_targets_by_key_similarity():
    image = full_image(index=0, rows=1, cols=6, offset=0)
    metric = torch.tensor([[1.0, 0], [0, 1], [0, 1], [0.1, 1], [1, 0], [1, 0.1]])
    # dominant patch 0; the rest 1..5 get 2 targets at the centres of 2 equal bins: rest[1] = 2, rest[3] = 4
    choice = contextual_merge(image, torch.tensor([0]), 2, metric, "add")
    assert choice.keep.tolist() == [0, 2, 4]
    expected = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0.5, 1, 0.5, 0, 0], [0, 0, 0, 0, 1, 1]])
    assert torch.allclose(choice.mix, expected)  # target + mean of the patches that joined it
    averaged = contextual_merge(image, torch.tensor([0]), 2, metric, "average")
    assert torch.allclose(averaged.mix[1], torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0, 0]))


def test_visiondrop_keeps_the_stage_budgets(model):
    input_ids, images = prompt(model)
    layout = model.visual_layout(input_ids, images)
    reduction = build_reduction("visiondrop", keep=0.5, contextual=0.25)
    with torch.no_grad():
        model(input_ids, images, reduction=reduction)
    for stage, ratio in enumerate([0.5, 0.25, 0.125]):
        kept = kept_patches(reduction, layout, stage)
        assert [len(kept[i]) for i in (0, 1)] == [budget(30, ratio), budget(24, ratio)]
    first = reduction.last_trace.stages[0].choices[0]  # budget 15: 4 contextual targets + 11 dominant
    merged_rows = (first.mix > 0).sum(dim=1)
    assert int((merged_rows > 1).sum()) <= 4 and int(merged_rows.sum()) == 30  # every patch of the image used once


# ---------------------------------------------------------------------------------------------------------------
# hand-made scores: the selection rules of HiPrune and FoPru


class ScoredContext:
    """Stands in for ReductionContext with fixed scores per (layer, image)."""

    remember = ReductionContext.remember
    recall = ReductionContext.recall

    def __init__(self, images, scores):
        self.images, self.scores, self.memory, self.layer = images, scores, {}, 0
        self.decoder = SimpleNamespace(config=SimpleNamespace(num_layers=4))

    def at(self, layer):
        self.layer = layer
        return self

    def received_attention(self, image):
        return self.scores[(self.layer, image.index)]


def test_grid_neighbours_stay_inside_the_grid_rows():
    image = full_image(0, 3, 3, offset=0)
    assert sorted(grid_neighbours(image, torch.tensor([2])).tolist()) == [1, 5]  # (0,2): no wrap to (1,0)
    assert sorted(grid_neighbours(image, torch.tensor([4])).tolist()) == [1, 3, 5, 7]


def test_hiprune_takes_anchors_their_buffers_then_registers():
    image = full_image(0, 4, 4)
    anchor_scores = torch.zeros(16)
    anchor_scores[5], anchor_scores[15] = 2.0, 1.0  # (1,1) and (3,3)
    register_scores = torch.arange(16, dtype=torch.float)  # later patches score higher
    ctx = ScoredContext([image], {(1, 0): anchor_scores, (2, 0): register_scores})
    method = build_reduction("hiprune", keep=0.5, anchor_layer=1, layer=2, alpha=1.0).method  # k = 8, 2 anchors
    assert method.select(ctx.at(1)) is None
    kept = set((method.select(ctx.at(2))[0].keep - 10).tolist())
    assert kept == {5, 1, 9, 4, 6, 15, 11, 14}  # anchors and their in-grid 4-neighbours fill the budget
    ctx = ScoredContext([image], {(1, 0): anchor_scores, (2, 0): register_scores})
    method = build_reduction("hiprune", keep=0.5, anchor_layer=1, layer=2, alpha=0.1).method  # 1 anchor
    method.select(ctx.at(1))
    kept = set((method.select(ctx.at(2))[0].keep - 10).tolist())
    assert kept == {5, 1, 9, 4, 6} | {15, 14, 13}  # anchor + buffers, then the top registers not yet chosen


def test_fopru_rank_and_row_strategies():
    image = full_image(0, 4, 5)
    scores = torch.zeros(20)
    scores[5:10] = 1.0 + 0.01 * torch.arange(5)  # row 1: the best mean
    scores[15:20] = 0.5  # row 3: the second best mean
    scores[0] = 2.0  # row 0 holds the single best patch, but its mean is only 0.4
    ctx = ScoredContext([image], {(2, 0): scores}).at(2)
    rows = build_reduction("fopru", keep=0.5, strategy="row").method.select(ctx)[0].keep - 10
    assert rows.tolist() == list(range(5, 10)) + list(range(15, 20))  # round(10 / 5) = 2 whole rows
    ranked = build_reduction("fopru", keep=0.25, strategy="rank").method.select(ctx)[0].keep - 10
    assert ranked.tolist() == [0, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="strategy='column'"):
        build_reduction("fopru", strategy="column")
