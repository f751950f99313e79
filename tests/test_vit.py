"""The ViT of the encoder-based baseline / EVE teacher: shapes at native aspect ratios, size errors, batching by
size, position dependence, token counts equal to the encoder-free conv embedder, the dense labels of its synthetic
pre-training, that pre-training itself (learns, deterministic), and strict save/load."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import monovlm.model.vit as vit_module
from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.images import num_image_tokens, resized_size
from monovlm.data.synthetic import COLORS, synthesize
from monovlm.model.embedders import ConvEmbedder
from monovlm.model.hf import CheckpointError
from monovlm.model.vit import (
    COLOUR_CLASSES, KIND_CLASSES, EncoderEmbedder, ViT, _collate, _pixel_labels, load_patch_dataset, load_vit,
    pretrain_vit, save_vit, sincos_position_embedding,
)

TINY = EncoderConfig(width=32, depth=2, heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    synthesize(folder, n=60, seed=0, image_size=32, progress=False)
    return folder


def test_output_shapes_at_native_aspect_ratios():
    vit = ViT(TINY, patch_size=4).eval()
    for height, width in [(12, 28), (4, 40), (36, 8), (16, 16)]:
        assert vit(torch.randn(2, 3, height, width)).shape == (2, height // 4, width // 4, 32)


def test_size_not_a_multiple_of_the_patch_is_named():
    vit = ViT(TINY, patch_size=4)
    with pytest.raises(ValueError, match="10x12"):
        vit(torch.randn(1, 3, 10, 12))


def test_features_equal_per_image_forward():
    vit = ViT(TINY, patch_size=4).eval()
    images = [torch.randn(3, 8, 12), torch.randn(3, 12, 8), torch.randn(3, 8, 12), torch.randn(3, 4, 4)]
    features = vit.features(images)
    for image, feature in zip(images, features):
        torch.testing.assert_close(feature, vit(image[None])[0], atol=1e-5, rtol=1e-5)


def test_position_embeddings_are_a_function_of_the_position_only():
    small, large = sincos_position_embedding(3, 5, 16), sincos_position_embedding(7, 9, 16)
    torch.testing.assert_close(small, large[:3, :5])  # no table to interpolate: a patch keeps its embedding
    flat = large.reshape(-1, 16)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e3).min() > 0.1  # every position distinct


def _shuffle_patches(pixels: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    """Permute the patches of (1, 3, H, W) by `order` over row-major patch indices."""
    _, channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    patches = pixels.reshape(channels, rows, patch, cols, patch).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)
    patches = patches[order].reshape(rows, cols, channels, patch, patch).permute(2, 0, 3, 1, 4)
    return patches.reshape(1, channels, height, width)


def test_shuffling_patches_changes_features_because_of_positions(monkeypatch):
    vit = ViT(TINY, patch_size=4).eval()
    pixels = torch.randn(1, 3, 12, 16)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    shuffled = vit(_shuffle_patches(pixels, 4, order)).reshape(12, -1)
    moved = vit(pixels).reshape(12, -1)[order]  # the original features, moved along with their patches
    assert not torch.allclose(shuffled, moved, atol=1e-3)
    # Without position embeddings the same check finds a permutation-equivariant model, so it can fail.
    monkeypatch.setattr(vit_module, "sincos_position_embedding", lambda *grid: torch.zeros(grid))
    shuffled = vit(_shuffle_patches(pixels, 4, order)).reshape(12, -1)
    torch.testing.assert_close(shuffled, vit(pixels).reshape(12, -1)[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cls,use_row_separator", [(True, True), (False, True), (True, False), (False, False)])
def test_encoder_embedder_token_counts_match_the_conv_embedder(use_cls, use_row_separator):
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, use_cls=use_cls,
                          use_row_separator=use_row_separator, max_pixels=64 * 64)
    encoder, conv = EncoderEmbedder(vision, TINY, hidden_size=24).eval(), ConvEmbedder(vision, hidden_size=24).eval()
    originals = [(20, 50), (64, 64), (33, 17), (8, 100), (200, 30)]
    images = [torch.randn(3, *resized_size(h, w, vision)) for h, w in originals]
    with torch.no_grad():
        for (h, w), ours, theirs in zip(originals, encoder(images), conv(images)):
            assert ours.shape == theirs.shape == (num_image_tokens(h, w, vision), 24)


def test_encoder_embedder_merges_neighbouring_patches_and_names_its_parts():
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, use_cls=False, use_row_separator=False)
    embedder = EncoderEmbedder(vision, TINY, hidden_size=24).eval()
    assert embedder.projector.mlp[0].in_features == TINY.width * 4  # 2×2 ViT tokens concatenated
    groups = {name.split(".")[0] for name, _ in embedder.named_parameters()}
    assert groups == {"encoder", "projector"}  # trained / frozen separately by name
    pixels = torch.randn(1, 3, 16, 24)
    features = embedder.encoder(pixels)  # (1, 4, 6, W)
    # Token (r, c) reads exactly ViT tokens (2r..2r+1, 2c..2c+1), in row-major order.
    window = features[0, 2:4, 4:6].reshape(-1)
    torch.testing.assert_close(embedder.grid(pixels)[0, 1, 2], embedder.projector.mlp(window), atol=1e-5, rtol=1e-5)


def test_pixel_labels_match_the_drawn_scene(synthetic):
    records = json.loads((synthetic / "scenes.json").read_text())
    scenes = [r for r in records if r["type"] == "scene"]
    assert any(r["word"] for r in scenes) and any(r["type"] == "maze" for r in records)
    for record in records:
        image = np.asarray(Image.open(synthetic / record["image"]).convert("RGB"))
        colour, kind = _pixel_labels(record, image)
        if record["type"] == "maze":
            walls = kind == KIND_CLASSES.index("wall")
            assert 0.2 < walls.mean() < 0.8 and image[walls].mean() < image[~walls].mean()  # walls are the dark part
            continue
        coloured = (image != image[..., :1]).any(-1)  # shape pixels; background and text are grey
        assert np.array_equal(coloured, colour > 0)
        for shape in record["shapes"]:
            assert COLOUR_CLASSES[colour[shape["cy"], shape["cx"]]] == shape["color"]
            assert KIND_CLASSES[kind[shape["cy"], shape["cx"]]] == shape["kind"]
        assert (kind == KIND_CLASSES.index("text")).any() == bool(record["word"])
        assert all(tuple(image[y, x]) == COLORS[COLOUR_CLASSES[colour[y, x]]] for y, x in zip(*np.nonzero(colour)))


def test_shifted_batches_keep_labels_and_centres_on_their_shapes(synthetic):
    vision = VisionConfig(patch_size=8, merge=1)
    samples = [s for s in load_patch_dataset(synthetic, vision, "train") if s["centres"]][:8]
    shifts = [(3, -4), (-4, 2), (0, 0), (4, 4), (-1, -3), (2, 0), (0, -2), (1, 1)][:len(samples)]
    batch = _collate(samples, 8, shifts)
    for image, row, col, colour, kind in batch["centres"].tolist():
        assert batch["kind"][image, row, col, kind] > 0 and batch["colour"][image, row, col, colour] > 0
    # pixels and labels move together: every coloured pixel still carries a colour label
    shifted_labels = torch.stack([vit_module._shift(s["labels"], dy, dx) for s, (dy, dx) in zip(samples, shifts)])
    grey = (batch["pixels"] == batch["pixels"][:, :1]).all(1)
    assert torch.equal(~grey, shifted_labels[:, 0] > 0)


def test_tiny_pretraining_learns_and_is_deterministic(synthetic):
    vision = VisionConfig(patch_size=8, merge=1)
    config = EncoderConfig(width=32, depth=1, heads=2, mlp_ratio=2.0)
    runs = []
    for seed, steps in ((0, 30), (0, 30), (1, 3)):
        report = {}
        vit = pretrain_vit(synthetic, config, vision, steps=steps, batch_size=8, lr=3e-3, seed=seed, progress=False,
                           report=report)
        runs.append((vit, report))
    (vit_a, report_a), (vit_b, report_b), (_, report_c) = runs
    losses = report_a["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert report_a["losses"] == report_b["losses"]
    for name, tensor in vit_a.state_dict().items():
        assert torch.equal(tensor, vit_b.state_dict()[name]), name
    assert report_c["losses"][0] != report_a["losses"][0]  # another seed: another init and data order
    assert 0.5 < report_a["test"]["colour"] <= 1.0  # evaluated on the held-out split
    assert not vit_a.training


def test_pretrain_needs_scenes(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        pretrain_vit(tmp_path, TINY, VisionConfig(patch_size=8, merge=1), steps=1, progress=False)


def test_save_load_round_trip(tmp_path):
    vit = ViT(EncoderConfig(width=32, depth=2, heads=4, mlp_ratio=3.0), patch_size=4).eval()
    folder = save_vit(vit, tmp_path / "teacher")
    loaded = load_vit(folder)
    assert loaded.config == vit.config and loaded.patch_size == 4
    pixels = torch.randn(2, 3, 8, 20)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), vit(pixels))


def test_load_names_a_missing_tensor_and_the_file(tmp_path):
    folder = save_vit(ViT(TINY, patch_size=4), tmp_path / "teacher")
    weights = folder / "vit.safetensors"
    tensors = load_file(str(weights))
    del tensors["blocks.1.attn.qkv.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"vit\.safetensors.*blocks\.1\.attn\.qkv\.weight"):
        load_vit(folder)


def test_load_rejects_an_extra_tensor_and_a_missing_folder(tmp_path):
    folder = save_vit(ViT(TINY, patch_size=4), tmp_path / "teacher")
    tensors = load_file(str(folder / "vit.safetensors"))
    tensors["head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(folder / "vit.safetensors"))
    with pytest.raises(CheckpointError, match="head.weight"):
        load_vit(folder)
    with pytest.raises(CheckpointError, match="nowhere"):
        load_vit(tmp_path / "nowhere")
