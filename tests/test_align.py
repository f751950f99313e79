"""EVE's patch-aligning layer: grid-token selection, hook capture, the aligner's loss, teacher grids, teachers."""

import dataclasses
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from monovlm.config import DecoderConfig, VisionConfig, VLMConfig
from monovlm.data.layout import TokenLayout
from monovlm.model.align import (
    HiddenCapture,
    PatchAligner,
    alignment_loss,
    eve_layers,
    grid_token_index,
    resample_grid,
)
from monovlm.model.decoder import Decoder, LayerInputs
from monovlm.model.teachers import (
    HFVisionTeacher,
    MissingTeacherFeatures,
    PrecomputedTeacher,
    Teacher,
    ViTTeacher,
    WhitenedTeacher,
    precompute_features,
)
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.train.recipe import AlignConfig

TEXT, CLS, SEP = -3, -1, -2


@pytest.fixture(autouse=True)
def _one_thread():
    # Every tensor here is tiny: a second intra-op thread buys nothing, and on a shared 2-core machine its spin-waits
    # made the 300-step optimisation below take ~100 s instead of ~0.2 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layout(rows, use_cls, use_sep):
    """rows: per batch row, items ("text", n) or ("image", rows, cols). Returns vision_mask (B, T), codes (B, T)
    where grid token (r, c) of the i-th image has code 1000·(i+1) + 10·r + c, and the grids in placeholder order."""
    sequences, grids = [], []
    for items in rows:
        codes = []
        for item in items:
            if item[0] == "text":
                codes += [TEXT] * item[1]
                continue
            _, height, width = item
            image = len(grids)
            grids.append((height, width))
            codes += [CLS] if use_cls else []
            for r in range(height):
                codes += [1000 * (image + 1) + 10 * r + c for c in range(width)] + ([SEP] if use_sep else [])
        sequences.append(codes)
    length = max(len(codes) for codes in sequences)
    codes = torch.tensor([c + [TEXT] * (length - len(c)) for c in sequences])
    return codes != TEXT, codes, grids


BATCH = [[("text", 2), ("image", 2, 3), ("text", 1), ("image", 3, 2), ("text", 2)],
         [("text", 1), ("image", 1, 4), ("image", 2, 2)]]  # two images back to back in the second row


def test_eve_layers_match_eve():
    assert eve_layers(32) == [0, 4, 8, 12, 16, 20, 24, 28, 32]  # EVE's layer_idx for Vicuna-7B, shallow to deep
    assert eve_layers(30) == [2, 6, 10, 14, 18, 22, 26, 30]  # anchored at the last layer
    assert eve_layers(3) == [3]


def layouts_of(grids, use_cls, use_sep):
    vision = VisionConfig(use_cls=use_cls, use_row_separator=use_sep)
    return [TokenLayout.of(rows, cols, vision) for rows, cols in grids]


@pytest.mark.parametrize("use_cls", [True, False])
@pytest.mark.parametrize("use_sep", [True, False])
def test_grid_token_index_picks_the_grid_positions(use_cls, use_sep):
    vision_mask, codes, grids = layout(BATCH, use_cls, use_sep)
    index = grid_token_index(vision_mask, layouts_of(grids, use_cls, use_sep))
    assert len(index) == len(grids) == 4
    flat_codes = codes.reshape(-1)
    for image, ((height, width), positions) in enumerate(zip(grids, index)):
        expected = [1000 * (image + 1) + 10 * r + c for r in range(height) for c in range(width)]
        assert flat_codes[positions].tolist() == expected
        assert positions.dtype == torch.long


def test_grid_token_index_rejects_mismatches():
    vision_mask, _, grids = layout(BATCH, True, True)
    layouts = layouts_of(grids, True, True)
    with pytest.raises(ValueError, match="placeholders"):
        grid_token_index(vision_mask, layouts[:-1])  # one image missing
    with pytest.raises(ValueError, match="placeholders"):
        grid_token_index(vision_mask, layouts_of(grids, False, True))  # layout flags disagree with the mask
    swapped = [layouts[1], layouts[0], *layouts[2:]]  # same total, wrong order: runs no longer line up
    with pytest.raises(ValueError, match="contiguous"):
        grid_token_index(vision_mask, swapped)
    with pytest.raises(ValueError):
        grid_token_index(None, layouts[:1])
    assert grid_token_index(None, []) == []


# ---------------------------------------------------------------------------------------------------------------------
# HiddenCapture


def tiny_decoder(num_layers=3):
    return Decoder(DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=num_layers,
                                 num_heads=4, num_kv_heads=2, initializer_range=0.2))


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hidden_capture_matches_a_manual_forward():
    decoder = tiny_decoder()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # the manual forward, layer by layer
        cos, sin = decoder.rotary(torch.arange(5)[None].expand(2, 5), x.dtype)
        inputs = LayerInputs(cos, sin, attn_mask=None, is_causal=True, routing=None)
        manual, h = [x], x
        for block in decoder.layers:
            h = block(h, inputs, None)
            manual.append(h)
        final = decoder.norm(h)
    depths = [0, 2, -1, "final", "embeddings", -3]
    with HiddenCapture(decoder, depths) as capture:
        assert hook_count(decoder) == 5  # one hook per distinct point, nothing else
        with torch.no_grad():
            decoder.hidden_states(inputs_embeds=x)
    expected = [manual[0], manual[2], manual[3], final, manual[0], manual[1]]
    for got, want in zip(capture.states, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(capture._states) == {0, 1, 2, 3, "final"}  # one entry per distinct requested point
    assert hook_count(decoder) == 0


def test_hidden_capture_keeps_only_requested_layers_and_validates():
    decoder = tiny_decoder(num_layers=4)
    with HiddenCapture(decoder, [-1]) as capture:
        decoder.hidden_states(inputs_embeds=torch.randn(1, 3, 32))
    assert list(capture._states) == [4] and len(capture.states) == 1
    with pytest.raises(ValueError, match="outside"):
        HiddenCapture(decoder, [5])
    with pytest.raises(ValueError, match="outside"):
        HiddenCapture(decoder, [-6])
    with pytest.raises(ValueError):
        HiddenCapture(decoder, ["nope"])
    with pytest.raises(RuntimeError, match="no hidden states"):
        with HiddenCapture(decoder, [1]) as empty:
            pass
        empty.states


def test_hidden_capture_removes_hooks_after_an_exception():
    decoder = tiny_decoder()
    with pytest.raises(RuntimeError, match="boom"):
        with HiddenCapture(decoder, [0, 1, "final"]):
            assert hook_count(decoder) == 3
            raise RuntimeError("boom")
    assert hook_count(decoder) == 0


# ---------------------------------------------------------------------------------------------------------------------
# PatchAligner


def identity_aligner(loss="cosine", weight=1.0):
    aligner = PatchAligner(hidden_size=2, teacher_dim=2, num_layers=1, heads=1, loss=loss, weight=weight)
    with torch.no_grad():
        aligner.input_layer.weight.copy_(torch.eye(2))
        aligner.input_layer.bias.zero_()
    return aligner


HAND_STUDENT = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])  # image A: 1 patch; image B: 3 patches
HAND_TEACHER = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 4.0], [-1.0, -1.0]])


def test_cosine_loss_by_hand_is_a_mean_over_images_of_means_over_patches():
    loss = identity_aligner()([HAND_STUDENT], HAND_TEACHER, [1, 3])
    image_a = 1.0  # orthogonal
    image_b = ((1 - 1 / math.sqrt(2)) + 0.0 + 2.0) / 3  # 45°, equal, opposite
    assert loss.item() == pytest.approx((image_a + image_b) / 2, abs=1e-6)
    scaled = identity_aligner(weight=2.5)([HAND_STUDENT], HAND_TEACHER, [1, 3])
    assert scaled.item() == pytest.approx(2.5 * loss.item(), abs=1e-6)


def test_mse_loss_by_hand():
    loss = identity_aligner(loss="mse")([HAND_STUDENT], HAND_TEACHER, [1, 3])
    image_a = (1 + 1) / 2
    image_b = ((0 + 1) / 2 + 0 + (9 + 9) / 2) / 3
    assert loss.item() == pytest.approx((image_a + image_b) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        PatchAligner(4, 4, 2, heads=1, loss="l1")


def eve_reference(aligner, captured):
    """EVE's VisionCompressor.cross_attention written out as in the original (broadcast product, not einsum)."""
    projected = torch.stack([norm(h) for norm, h in zip(aligner.norm_layers, captured)][::-1], dim=1)  # deepest first
    tokens, depths, width = projected.shape
    q = projected[:, :1].reshape(tokens, 1, aligner.heads, -1).transpose(1, 2)
    kv = projected[:, 1:].reshape(tokens, depths - 1, aligner.heads, -1).transpose(1, 2)
    attention = (q * aligner.scale * kv).sum(-1).softmax(dim=-1)
    fused = (attention.unsqueeze(-1) * kv).sum(-2)
    return aligner.input_layer(captured[-1]) + aligner.output_layer(fused.reshape(tokens, -1))


def test_fusion_matches_eve_formula():
    aligner = PatchAligner(hidden_size=12, teacher_dim=8, num_layers=4, heads=2)
    captured = [torch.randn(7, 12) * 3 for _ in range(4)]
    torch.testing.assert_close(aligner.predict(captured), eve_reference(aligner, captured))
    assert aligner.scale == 8**-0.5
    with pytest.raises(ValueError, match="built for 4"):
        aligner.predict(captured[:3])


def test_loss_is_zero_when_the_student_already_predicts_the_teacher():
    aligner = PatchAligner(hidden_size=8, teacher_dim=8, num_layers=3, heads=2)
    with torch.no_grad():
        aligner.input_layer.weight.copy_(torch.eye(8))
        aligner.input_layer.bias.zero_()
        aligner.output_layer.weight.zero_()
        aligner.output_layer.bias.zero_()
    captured = [torch.randn(10, 8) for _ in range(3)]
    assert aligner(captured, captured[-1].clone(), [4, 6]).item() == pytest.approx(0.0, abs=1e-6)
    aligner.loss = "mse"
    assert aligner(captured, captured[-1].clone(), [4, 6]).item() == pytest.approx(0.0, abs=1e-10)


def test_training_the_aligner_drives_the_loss_to_zero():
    aligner = PatchAligner(hidden_size=16, teacher_dim=8, num_layers=3, heads=2)
    captured = [torch.randn(24, 16) for _ in range(3)]
    teacher = captured[-1] @ torch.randn(16, 8)  # reachable: a linear map of the deepest state
    optimizer = torch.optim.Adam(aligner.parameters(), lr=1e-2)
    first = aligner(captured, teacher, [10, 14]).item()
    for _ in range(300):
        optimizer.zero_grad()
        loss = aligner(captured, teacher, [10, 14])
        loss.backward()
        optimizer.step()
    assert first > 0.3 and loss.item() < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Teacher grids


def test_resample_larger_teacher_grid_average_pools():
    teacher = torch.randn(4, 6, 5)
    expected = teacher.reshape(2, 2, 3, 2, 5).mean(dim=(1, 3))  # mean of each 2×2 block
    torch.testing.assert_close(resample_grid(teacher, 2, 3), expected)


def test_resample_smaller_teacher_grid_interpolates_bilinearly():
    teacher = torch.tensor([0.0, 1.0]).view(1, 2, 1)
    out = resample_grid(teacher, 1, 4)
    # align_corners=False: source x = (x' + 0.5) / 2 − 0.5, clamped at the borders
    torch.testing.assert_close(out.view(-1), torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(resample_grid(torch.ones(1, 1, 3) * 2, 2, 3), torch.ones(2, 3, 3) * 2)


def test_resample_equal_and_mixed_grids():
    teacher = torch.randn(3, 2, 4)
    assert torch.equal(resample_grid(teacher, 3, 2), teacher)
    tall = torch.arange(4.0).view(4, 1, 1)  # 4 rows, 1 column -> 2 rows (pooled), 2 columns (interpolated)
    torch.testing.assert_close(resample_grid(tall, 2, 2).view(2, 2), torch.tensor([[0.5, 0.5], [2.5, 2.5]]))


# ---------------------------------------------------------------------------------------------------------------------
# The whole loss on an EncoderFreeVLM

IMAGE_ID = 63
VISION = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=64 * 64)


def tiny_vlm(num_layers=4):
    decoder = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=4,
                            num_kv_heads=2, initializer_range=0.1, special_tokens={"image": IMAGE_ID})
    return EncoderFreeVLM(VLMConfig(decoder=decoder, vision=VISION)).train()


def test_alignment_loss_trains_the_embedder_and_the_layers_up_to_the_last_captured_one():
    model = tiny_vlm(num_layers=4)
    images = [torch.randn(3, 16, 24), torch.randn(3, 24, 16)]  # grids (2, 3) and (3, 2): 9 and 10 placeholders
    layouts = [TokenLayout.for_image(image, VISION) for image in images]
    assert [(layout.rows, layout.cols) for layout in layouts] == [(2, 3), (3, 2)]
    input_ids = torch.tensor([[5, 6] + [IMAGE_ID] * 9 + [7], [8] + [IMAGE_ID] * 10 + [9]])
    labels = input_ids.clone()
    depths = [0, 2]  # the embeddings and the output of layers[1]; layers[2:] and the final norm come after
    aligner = PatchAligner(hidden_size=32, teacher_dim=16, num_layers=len(depths), heads=4)
    with HiddenCapture(model.decoder, depths) as capture:
        ce = model.loss(input_ids, labels, images)
    teacher = [torch.randn(4, 6, 16), torch.randn(1, 1, 16)]  # a larger and a smaller teacher grid
    loss = alignment_loss(aligner, capture.states, input_ids == IMAGE_ID, layouts, teacher)
    assert loss.dim() == 0 and 0.0 < loss.item() < 2.0 and torch.isfinite(ce)
    loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.embedder.patch_conv) and has_grad(model.embedder.merge_conv)
    assert has_grad(model.decoder.layers[0]) and has_grad(model.decoder.layers[1])
    assert not has_grad(model.decoder.layers[2]) and not has_grad(model.decoder.layers[3])
    assert not has_grad(model.decoder.norm)
    assert all(p.grad is not None for p in aligner.parameters())
    assert not any(name.startswith(("aligner", "teacher")) for name in model.state_dict())


def test_text_only_batch_gives_a_connected_zero():
    model = tiny_vlm(num_layers=2)
    aligner = PatchAligner(hidden_size=32, teacher_dim=16, num_layers=2, heads=4)
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with HiddenCapture(model, [0, -1]) as capture:  # a model with .decoder is accepted too
        model.loss(input_ids, input_ids)
    loss = alignment_loss(aligner, capture.states, None, [], [])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in aligner.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Teachers


class TinyViT(nn.Module):
    """Stand-in with monovlm.model.vit.ViT's interface: features(images) -> [(rows, cols, width)]."""

    def __init__(self, width=8, patch=8):
        super().__init__()
        self.config = SimpleNamespace(width=width)
        self.patch = nn.Conv2d(3, width, patch, stride=patch)

    def features(self, images):
        return [self.patch(image[None])[0].permute(1, 2, 0) for image in images]


def assert_frozen(module):
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())


def test_vit_teacher_is_frozen_and_gives_grids():
    vit = TinyViT().train()
    teacher = ViTTeacher(vit)
    assert isinstance(teacher, Teacher) and teacher.feature_dim == 8
    assert_frozen(vit)
    features = teacher([torch.randn(3, 16, 24), torch.randn(3, 8, 8)])
    assert [tuple(f.shape) for f in features] == [(2, 3, 8), (1, 1, 8)]
    assert not any(f.requires_grad for f in features)


def test_vit_teacher_with_monovlm_vit():
    vit_module = pytest.importorskip("monovlm.model.vit")  # written alongside; the stand-in above covers the API
    from monovlm.config import EncoderConfig

    teacher = ViTTeacher(vit_module.ViT(EncoderConfig(width=16, depth=1, heads=2), patch_size=8))
    assert teacher.feature_dim == 16
    assert_frozen(teacher.vit)
    features = teacher([torch.randn(3, 16, 24), torch.randn(3, 8, 16)])
    assert [tuple(f.shape) for f in features] == [(2, 3, 16), (1, 2, 16)]


def test_vit_teacher_patch_size_keeps_the_students_image_sizes(tmp_path):
    from monovlm.data.synthetic import synthesize
    from monovlm.model.teachers import build_teacher, teacher_vision

    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    assert teacher_vision(vision, None) is vision and teacher_vision(vision, 4) is vision
    whole_token = teacher_vision(vision, 8)
    assert (whole_token.patch_size, whole_token.merge, whole_token.pixels_per_token) == (8, 1, 8)
    with pytest.raises(ValueError, match="teacher_patch_size=3 must divide the model's 8 pixels per token"):
        teacher_vision(vision, 3)
    synthesize(tmp_path / "data", n=12, seed=0, image_size=32, progress=False)
    align = AlignConfig(teacher="vit", teacher_width=16, teacher_depth=1, teacher_heads=2, teacher_stem="patch",
                        teacher_steps=2, teacher_lr=1e-3, teacher_patch_size=8, teacher_objective="labels",
                        whiten=False)
    teacher = build_teacher(align, vision, tmp_path / "data", tmp_path / "run", progress=False)
    assert teacher.vit.patch_size == 8
    assert [tuple(f.shape) for f in teacher([torch.randn(3, 32, 32)])] == [(4, 4, 16)]  # one feature per token


def test_vit_teacher_is_reused_only_with_the_same_settings_and_data(tmp_path, monkeypatch, capsys):
    from monovlm.data.synthetic import synthesize
    from monovlm.model.teachers import build_teacher
    from monovlm.train import vit_pretrain

    calls, seeds = [], []
    original = vit_pretrain.pretrain_vit
    monkeypatch.setattr(vit_pretrain, "pretrain_vit",
                        lambda *a, **k: calls.append(k["steps"]) or seeds.append(k["seed"]) or original(*a, **k))
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    synthesize(tmp_path / "data", n=12, seed=0, image_size=32, progress=False)
    align = AlignConfig(teacher="vit", teacher_width=16, teacher_depth=1, teacher_heads=2, teacher_stem="patch",
                        teacher_steps=2, teacher_lr=1e-3, teacher_patch_size=8, teacher_objective="labels",
                        whiten=False)
    build_teacher(align, vision, tmp_path / "data", tmp_path / "run", progress=False)
    build_teacher(align, vision, tmp_path / "data", tmp_path / "run", progress=False)  # resume: reused
    assert calls == [2]
    build_teacher(dataclasses.replace(align, teacher_steps=3), vision, tmp_path / "data", tmp_path / "run",
                  progress=False)
    assert calls == [2, 3] and "pretraining the teacher again" in capsys.readouterr().out
    synthesize(tmp_path / "data", n=12, seed=1, image_size=32, progress=False)  # other images, same folder
    build_teacher(dataclasses.replace(align, teacher_steps=3), vision, tmp_path / "data", tmp_path / "run",
                  progress=False)
    assert calls == [2, 3, 3]
    deeper = dataclasses.replace(align, teacher_steps=3, teacher_stem="conv", teacher_stem_depth=2)
    teacher = build_teacher(deeper, vision, tmp_path / "data", tmp_path / "run", progress=False)
    assert calls == [2, 3, 3, 3]  # another stem: pretrained again, and the saved ViT has it
    assert teacher.vit.config.stem == "conv" and teacher.vit.config.stem_depth == 2
    build_teacher(dataclasses.replace(deeper, teacher_seed=1), vision, tmp_path / "data", tmp_path / "run",
                  progress=False)
    assert calls == [2, 3, 3, 3, 3] and seeds == [0, 0, 0, 0, 1]  # another teacher seed: pretrained again with it


def test_whitened_teacher_has_unit_covariance_on_its_fit_images():
    torch.manual_seed(0)
    vit = TinyViT(width=8)
    with torch.no_grad():
        vit.patch.weight[:4] *= 50.0  # four loud directions beside four quiet ones, as in a real teacher
    base = ViTTeacher(vit)
    images = [torch.randn(3, 32, 32) for _ in range(64)]  # 64 × 16 patches of 8 features
    teacher = WhitenedTeacher.fit(base, images, eps=1e-6)
    assert teacher.feature_dim == 8
    raw = torch.cat([f.reshape(-1, 8) for f in base(images)])
    whitened = torch.cat([f.reshape(-1, 8) for f in teacher(images)])  # (1024, 8)
    assert raw.var(0).max() / raw.var(0).min() > 100  # the loud directions dominate before ...
    assert whitened.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(whitened.T), torch.eye(8), atol=1e-3)  # ... and weigh the same after
    # a fixed affine map: whitening a new image does not depend on what else is in the batch
    other = torch.randn(3, 16, 24)
    assert torch.allclose(teacher([other])[0], teacher([other, images[0]])[0], atol=1e-6)
    assert teacher([other])[0].shape == (2, 3, 8)
    with pytest.raises(ValueError, match="at least one image"):
        WhitenedTeacher.fit(base, [])


def test_build_teacher_whitens_when_the_recipe_asks(tmp_path):
    from monovlm.data.synthetic import synthesize
    from monovlm.model.teachers import build_teacher

    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    synthesize(tmp_path / "data", n=12, seed=0, image_size=32, progress=False)
    align = AlignConfig(teacher="vit", teacher_width=16, teacher_depth=1, teacher_heads=2, teacher_stem="patch",
                        teacher_steps=2, teacher_lr=1e-3, teacher_patch_size=8, teacher_objective="labels",
                        whiten=True, whiten_images=8)
    teacher = build_teacher(align, vision, tmp_path / "data", tmp_path / "run", progress=False,
                            sources=["captions.json"])
    assert isinstance(teacher, WhitenedTeacher) and teacher.feature_dim == 16
    from monovlm.train.flops import teacher_params

    assert teacher_params(teacher) == sum(p.numel() for p in teacher.teacher.vit.parameters()) > 0
    plain = build_teacher(dataclasses.replace(align, whiten=False), vision, tmp_path / "data",
                          tmp_path / "run", progress=False)  # reuses the pretrained ViT in RUN/teacher
    image = torch.randn(3, 32, 32)
    expected = (plain([image])[0] - teacher.mean) @ teacher.transform
    assert torch.allclose(teacher([image])[0], expected, atol=1e-5)


def save_tiny_hf(tmp_path, kind, preprocessor=None):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                    patch_size=8)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**settings))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**settings))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder, model.eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_teachers_from_local_folders(tmp_path, kind):
    pytest.importorskip("transformers")
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    folder, reference = save_tiny_hf(tmp_path, kind, {"image_mean": mean, "image_std": std} if kind == "clip" else None)
    vision = VisionConfig(image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    teacher = HFVisionTeacher.from_folder(folder, select_layer=-2, vision=vision)
    assert isinstance(teacher, Teacher) and teacher.feature_dim == 32
    assert_frozen(teacher.model)
    if kind == "siglip":
        mean, std = (0.5,) * 3, (0.5,) * 3  # SigLIP's defaults when the folder has no preprocessor_config.json
    raw = torch.rand(3, 32, 32)  # already at the teacher's size, so the resize is the identity
    ours = (raw - torch.tensor(vision.image_mean).view(3, 1, 1)) / torch.tensor(vision.image_std).view(3, 1, 1)
    features = teacher([ours, torch.randn(3, 16, 40)])
    assert [tuple(f.shape) for f in features] == [(4, 4, 32), (4, 4, 32)]
    assert not any(f.requires_grad for f in features)
    theirs = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        hidden = reference(pixel_values=theirs[None], output_hidden_states=True).hidden_states[-2][0]
    tokens = hidden[1:] if kind == "clip" else hidden  # CLIP's CLS dropped; SigLIP has none
    assert tokens.shape[0] == 16
    torch.testing.assert_close(features[0], tokens.reshape(4, 4, 32), rtol=1e-4, atol=1e-4)
    bigger = HFVisionTeacher.from_folder(folder, select_layer=-1, image_size=48, vision=vision)
    assert tuple(bigger([ours])[0].shape) == (6, 6, 32)  # position embeddings interpolated


def test_hf_teacher_errors(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    vision = VisionConfig()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFVisionTeacher.from_folder(tmp_path / "nowhere", vision=vision)
    folder, _ = save_tiny_hf(tmp_path, "clip")
    with pytest.raises(ValueError, match="select_layer"):
        HFVisionTeacher.from_folder(folder, select_layer=-5, vision=vision)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight"):
        HFVisionTeacher.from_folder(folder, vision=vision)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers"):
        HFVisionTeacher.from_folder(folder, vision=vision)


@pytest.mark.slow  # a fresh interpreter
def test_runtime_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import monovlm.model.align, monovlm.model.teachers\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_precomputed_teacher_round_trip_and_missing_key(tmp_path):
    source = ViTTeacher(TinyViT())
    images = {"a.png": torch.randn(3, 16, 24), "dir/b.png": torch.randn(3, 8, 8), "sample-7": torch.randn(3, 24, 8)}
    path = precompute_features(source, images.items(), tmp_path / "feats" / "teacher.safetensors", batch_size=2)
    teacher = PrecomputedTeacher(path)
    assert isinstance(teacher, Teacher) and teacher.feature_dim == 8 and len(teacher) == 3
    keys = ["dir/b.png", "a.png", "sample-7"]
    got = teacher([images[k] for k in keys], keys)
    want = source([images[k] for k in keys])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(MissingTeacherFeatures) as error:
        teacher([images["a.png"]], ["missing.png"])
    assert isinstance(error.value, KeyError)
    assert "missing.png" in str(error.value) and str(path) in str(error.value)
    with pytest.raises(ValueError, match="keys"):
        teacher([images["a.png"]])
    with pytest.raises(ValueError, match="duplicate"):
        precompute_features(source, [("x", images["a.png"]), ("x", images["a.png"])], tmp_path / "dup.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Teachers on a user's data: the "mae" ViT, whitening for every teacher, features: paths, float16 features


def tiny_vit_align(**overrides):
    values = dict(teacher="vit", teacher_objective="mae", teacher_width=16, teacher_depth=1, teacher_heads=2,
                  teacher_stem="patch", teacher_steps=2, teacher_lr=1e-3, teacher_patch_size=8, whiten=False,
                  whiten_images=8)
    return AlignConfig(**{**values, **overrides})


def test_float16_teacher_features_train_under_bf16_autocast():
    """A features file saved in float16 beside a bf16 autocast forward: torch.cat of float16 targets inside autocast
    raised "Unexpected floating ScalarType"; the targets are cast to float32 first, and give float32's loss."""
    torch.manual_seed(0)
    aligner = PatchAligner(hidden_size=16, teacher_dim=8, num_layers=2, heads=2)
    layouts = layouts_of([(2, 3), (2, 2)], use_cls=False, use_sep=False)
    states = [torch.randn(1, 12, 16) for _ in range(2)]
    vision_mask = torch.ones(1, 12, dtype=torch.bool)
    vision_mask[0, :2] = False  # two text tokens, then the 6 + 4 visual tokens
    teacher = [torch.randn(4, 4, 8).half(), torch.randn(2, 2, 8).half()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = alignment_loss(aligner, states, vision_mask, layouts, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = alignment_loss(aligner, states, vision_mask, layouts, [t.float() for t in teacher])
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, full)


def test_mae_vit_teacher_trains_on_a_users_folder_and_whitens_on_its_images(tmp_path, monkeypatch):
    from image_folder import write_llava_folder

    from monovlm.model.teachers import build_teacher
    from monovlm.train import vit_pretrain

    data = write_llava_folder(tmp_path / "data", n=10, size=(32, 32))
    assert not (data / "scenes.json").exists()
    calls = []
    original = vit_pretrain.pretrain_vit
    monkeypatch.setattr(vit_pretrain, "pretrain_vit",
                        lambda *a, **k: calls.append((k["objective"], list(k["sources"]))) or original(*a, **k))
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    teacher = build_teacher(tiny_vit_align(whiten=True, whiten_images=10), vision, data, tmp_path / "run",
                            progress=False, sources=[("captions.json", None)])
    assert calls == [("mae", [("captions.json", None)])]
    assert isinstance(teacher, WhitenedTeacher) and teacher.teacher.vit.patch_size == 8
    # whitened on the folder's 10 images: unit covariance over their patches (10 images × 16 patches > 16 dims)
    from monovlm.data.image_files import data_images, load_pixels

    pixels = [load_pixels(image, vision) for image in data_images(data, ["captions.json"])]
    whitened = torch.cat([f.reshape(-1, 16) for f in teacher(pixels)])
    assert whitened.mean(0).abs().max() < 1e-3
    # every direction at unit variance, but one: the ViT's final LayerNorm makes each feature sum to ~0 over its
    # channels, a direction without variance that whitening leaves (floored) at ~0
    spectrum = torch.linalg.eigvalsh(torch.cov(whitened.T))
    assert spectrum[0] < 1e-2 and torch.allclose(spectrum[1:], torch.ones(15), atol=0.05)
    build_teacher(tiny_vit_align(), vision, data, tmp_path / "run", progress=False, sources=[("captions.json", None)])
    assert len(calls) == 1  # same settings and data files: reused
    # no sources given: those of the recipe the trainer recorded in RUN/recipe.json (here another file: retrained)
    (tmp_path / "run" / "recipe.json").write_text(json.dumps({"stages": [{"data": ["qa.json"], "image_root": None}]}))
    build_teacher(tiny_vit_align(), vision, data, tmp_path / "run", progress=False)
    assert calls[1] == ("mae", [("qa.json", None)])
    with pytest.raises(FileNotFoundError, match="recipe.json"):
        build_teacher(tiny_vit_align(), vision, data, tmp_path / "other_run", progress=False)
    with pytest.raises(ValueError, match="teacher_objective='clip'"):
        build_teacher(tiny_vit_align(teacher_objective="clip"), vision, data, tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="scenes.json"):  # the labels objective needs synthetic data
        build_teacher(tiny_vit_align(teacher_objective="labels"), vision, data, tmp_path / "run", progress=False,
                      sources=["captions.json"])


def test_whitening_applies_to_features_teachers_and_their_path_is_read_under_the_data_root(tmp_path, monkeypatch):
    from image_folder import write_llava_folder

    from monovlm.data.image_files import data_images, load_pixels
    from monovlm.model.teachers import build_teacher

    data = write_llava_folder(tmp_path / "data", n=10, size=(32, 32))
    vision = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)
    source = ViTTeacher(TinyViT(width=8))
    images = data_images(data, ["captions.json"])
    pixels = {image.key: load_pixels(image, vision) for image in images}
    precompute_features(source, pixels.items(), data / "feats" / "teacher.safetensors", dtype=torch.float16)
    monkeypatch.chdir(tmp_path)  # a relative path must not be read from the working directory
    align = SimpleNamespace(teacher="features:feats/teacher.safetensors", whiten=False, whiten_images=512)
    plain = build_teacher(align, vision, data, tmp_path / "run", sources=["captions.json"])
    assert isinstance(plain, PrecomputedTeacher) and plain.path == data / "feats" / "teacher.safetensors"
    whitened = build_teacher(SimpleNamespace(**{**vars(align), "whiten": True}), vision, data, tmp_path / "run",
                             sources=["captions.json"])
    assert isinstance(whitened, WhitenedTeacher)
    keys = list(pixels)
    features = torch.cat([f.reshape(-1, 8).float() for f in whitened(None, keys)])  # read by key, no pixels
    assert torch.allclose(torch.cov(features.T), torch.eye(8), atol=1e-2)
    with pytest.raises(FileNotFoundError, match=r"data root, --data .*monovlm teacher features"):
        build_teacher(SimpleNamespace(**{**vars(align), "teacher": "features:nothere.safetensors"}), vision, data,
                      tmp_path / "run")
    absolute = SimpleNamespace(**{**vars(align), "teacher": f"features:{data / 'feats' / 'teacher.safetensors'}"})
    assert build_teacher(absolute, vision, tmp_path, tmp_path / "run").path == data / "feats" / "teacher.safetensors"


def test_whitening_applies_to_hf_teachers(tmp_path):
    pytest.importorskip("transformers")
    from image_folder import write_llava_folder

    from monovlm.model.teachers import build_teacher

    data = write_llava_folder(tmp_path / "data", n=12, size=(32, 32))
    folder, _ = save_tiny_hf(tmp_path, "siglip")
    vision = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)
    align = SimpleNamespace(teacher=f"hf:{folder}", whiten=True, whiten_images=12)
    teacher = build_teacher(align, vision, data, tmp_path / "run", sources=["captions.json"])
    assert isinstance(teacher, WhitenedTeacher) and isinstance(teacher.teacher, HFVisionTeacher)
    plain = HFVisionTeacher.from_folder(folder, vision=vision)
    image = torch.randn(3, 32, 32)
    torch.testing.assert_close(teacher([image])[0], (plain([image])[0] - teacher.mean) @ teacher.transform)


def test_an_hf_teacher_is_stored_in_the_runs_autocast_dtype(tmp_path):
    """Under bf16 autocast the trainer passes hf_dtype=bf16: the frozen tower's weights take half the memory and its
    whitened features stay close to the fp32 tower's (its matmuls ran in bf16 under autocast anyway)."""
    pytest.importorskip("transformers")
    from image_folder import write_llava_folder

    from monovlm.model.teachers import build_teacher

    data = write_llava_folder(tmp_path / "data", n=12, size=(32, 32))
    folder, _ = save_tiny_hf(tmp_path, "siglip")
    vision = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)
    align = SimpleNamespace(teacher=f"hf:{folder}", whiten=False, whiten_images=12)
    full = build_teacher(align, vision, data, tmp_path / "run", sources=["captions.json"])
    half = build_teacher(align, vision, data, tmp_path / "run", sources=["captions.json"], hf_dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    image = torch.randn(3, 32, 32)
    reference, features = full([image])[0], half([image])[0].float()
    assert not torch.equal(features, reference)
    torch.testing.assert_close(features, reference, atol=0.1, rtol=0.05)


def test_init_stem_names_what_does_not_match():
    """`[align] init_stem` copies the teacher's stem into the student: a stem, patch side, width or teacher that
    cannot be copied is a ConfigError naming each mismatch; a matching pair copies so that both stems agree."""
    from monovlm.config import ConfigError, EncoderConfig, VisionConfig
    from monovlm.model.embedders import build_embedder
    from monovlm.model.teachers import check_stem_init, init_stem_from_teacher
    from monovlm.model.vit import ViT
    from monovlm.train.recipe import AlignConfig

    align = AlignConfig(teacher_width=16, teacher_depth=0, teacher_stem="cnn", teacher_patch_size=8, init_stem=True)
    vision = VisionConfig(embedder="eve", patch_size=8, merge=1, embedder_width=16, stem="cnn", max_pixels=32 * 32)
    check_stem_init(align, vision)
    with pytest.raises(ConfigError, match=r"stem: student 'patch', teacher 'cnn'"):
        check_stem_init(align, dataclasses.replace(vision, stem="patch"))
    with pytest.raises(ConfigError, match=r"patch side: student 4, teacher 8.*width: student 32, teacher 16"):
        check_stem_init(align, dataclasses.replace(vision, patch_size=4, merge=2, embedder_width=32))
    with pytest.raises(ConfigError, match="not monovlm's own"):
        check_stem_init(dataclasses.replace(align, teacher="hf:/models/siglip"), vision)
    with pytest.raises(ConfigError, match="embedder 'linear' has no patch stem"):
        check_stem_init(dataclasses.replace(align, teacher_stem="patch"),
                        dataclasses.replace(vision, embedder="linear", stem="patch"))

    torch.manual_seed(0)
    vit = ViT(EncoderConfig(width=16, depth=0, heads=2, stem="cnn"), 8).eval()
    vit.patch_embed[1].running_mean.uniform_(-1, 1)  # statistics a trained teacher would have
    embedder = build_embedder(vision, 32).eval()
    pixels = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(embedder.stem(pixels), vit.patch_embed(pixels))
    init_stem_from_teacher(embedder, vit)
    assert torch.equal(embedder.stem(pixels), vit.patch_embed(pixels))  # (2, 16, 4, 4) each

    # "patch+cnn": the CNN part takes the teacher's, the patch part starts at 0 (and trains): the sum is the teacher's
    summed = dataclasses.replace(vision, stem="patch+cnn")
    check_stem_init(align, summed)
    with pytest.raises(ConfigError, match=r"stem: student 'patch\+cnn', teacher 'conv'"):
        check_stem_init(dataclasses.replace(align, teacher_stem="conv"), summed)
    with pytest.raises(ConfigError, match=r"stem depth: student 1, teacher 2"):
        check_stem_init(dataclasses.replace(align, teacher_stem="conv", teacher_stem_depth=2),
                        dataclasses.replace(vision, stem="patch+conv"))
    with pytest.raises(ConfigError, match=r"stem 'patch': only a 'cnn' or 'conv' stem"):
        check_stem_init(dataclasses.replace(align, teacher_stem="patch"), dataclasses.replace(vision, stem="patch"))
    embedder = build_embedder(summed, 32).eval()
    init_stem_from_teacher(embedder, vit)
    assert torch.equal(embedder.stem(pixels), vit.patch_embed(pixels))
    assert all(p.requires_grad and not p.any() for p in embedder.stem.patch.parameters())
    embedder.stem(pixels).square().sum().backward()
    assert embedder.stem.patch.weight.grad.abs().sum() > 0
