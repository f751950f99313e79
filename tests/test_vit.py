"""The ViT of the encoder-based baseline / EVE teacher: shapes at native aspect ratios, size errors, batching by
size, position dependence, the baseline's embedder (token counts equal to the encoder-free conv embedder), and strict
save/load."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import monovlm.model.vit as vit_module
from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.images import num_image_tokens, resized_size
from monovlm.model.embedders import ConvEmbedder, EncoderEmbedder
from monovlm.model.hf import CheckpointError
from monovlm.model.vit import ViT, load_vit, save_vit, sincos_position_embedding

TINY = EncoderConfig(width=32, depth=2, heads=2, mlp_ratio=2.0)


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


def test_encoding_a_subset_of_tokens_keeps_their_positions():
    """Masked-patch pretraining runs the blocks on the visible tokens only: embed + encode must equal the forward,
    and a subset encoded alone must match the full forward when no block mixes the tokens."""
    vit = ViT(TINY, patch_size=4).eval()
    pixels = torch.randn(2, 3, 8, 12)
    tokens = vit.embed(pixels)  # (2, 2, 3, 32)
    assert tokens.shape == (2, 2, 3, 32)
    torch.testing.assert_close(vit.encode(tokens.reshape(2, 6, 32)).view(2, 2, 3, 32), vit(pixels))
    no_blocks = ViT(TINY, patch_size=4).eval()
    no_blocks.blocks = torch.nn.ModuleList()  # per-token stem, positions and norm only
    full = no_blocks(pixels).reshape(2, 6, 32)
    keep = torch.tensor([[5, 0], [2, 3]])
    visible = no_blocks.embed(pixels).reshape(2, 6, 32).gather(1, keep[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(no_blocks.encode(visible), full.gather(1, keep[..., None].expand(-1, -1, 32)))
    with pytest.raises(ValueError, match="10x12"):
        vit.embed(torch.randn(1, 3, 10, 12))


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


def test_save_load_round_trip(tmp_path):
    vit = ViT(EncoderConfig(width=32, depth=2, heads=4, mlp_ratio=3.0), patch_size=4).eval()
    folder = save_vit(vit, tmp_path / "teacher")
    loaded = load_vit(folder)
    assert loaded.config == vit.config and loaded.patch_size == 4
    pixels = torch.randn(2, 3, 8, 20)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixels), vit(pixels))  # eval: the saved running statistics, not the batch's


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


def test_the_conv_stem_gives_the_same_grid_and_sees_across_patch_borders():
    """`stem = "conv"`: log2(patch) stride-2 3×3 convs then 1×1 — the same (rows, cols) grid as the patch stem, but a
    token's stem output also depends on the pixels just across its patch border (the patch stem's does not)."""
    from monovlm.config import ConfigError, EncoderConfig
    from monovlm.model.vit import ViT

    torch.manual_seed(0)
    conv = ViT(EncoderConfig(width=32, depth=1, heads=2, stem="conv"), 8)
    patch = ViT(EncoderConfig(width=32, depth=1, heads=2), 8)
    pixels = torch.randn(1, 3, 32, 48)
    moved = pixels.clone()
    moved[..., 7, 7] += 5.0  # the last pixel of token (0, 0), at token (1, 1)'s top-left corner
    for vit, sees_across in ((conv, True), (patch, False)):
        before, after = vit.embed(pixels), vit.embed(moved)
        assert before.shape == (1, 4, 6, 32)
        assert ((after[0, 1, 1] - before[0, 1, 1]).abs().max().item() > 1e-6) == sees_across
        assert (after[0, 0, 0] - before[0, 0, 0]).abs().max().item() > 1e-6
        assert torch.equal(after[0, 2:], before[0, 2:])  # far tokens: untouched either way
    with pytest.raises(ConfigError, match="power-of-two"):
        ViT(EncoderConfig(width=32, depth=1, heads=2, stem="conv"), 6)
    with pytest.raises(ConfigError, match="stem"):
        EncoderConfig(stem="mlp")


def test_the_cnn_stem_sees_whole_shapes_and_saves_its_batch_statistics(tmp_path):
    """`stem = "cnn"`: the same (rows, cols) grid; a token's feature depends on pixels well beyond its own patch and
    its neighbours' (39 px around a patch of 8), and the BatchNorm statistics learnt in training are saved with it."""
    from monovlm.config import ConfigError, EncoderConfig
    from monovlm.model.vit import ViT, load_vit, save_vit

    torch.manual_seed(0)
    vit = ViT(EncoderConfig(width=32, depth=1, heads=2, stem="cnn"), 8)
    pixels = torch.randn(2, 3, 48, 48)
    vit.train()
    vit(pixels)  # one training forward: the running statistics move off their start
    vit.eval()
    moved = pixels.clone()
    moved[:, :, 14:16, 14:16] += 5.0  # pixels of token (1, 1): seen by token (0, 0) (the conv stem's would not
    # see them: 15 px around it), not by token (5, 5)
    before, after = vit.embed(pixels), vit.embed(moved)
    assert before.shape == (2, 6, 6, 32)
    assert (after[0, 0, 0] - before[0, 0, 0]).abs().max().item() > 1e-6
    assert torch.equal(after[0, 5, 5], before[0, 5, 5])
    save_vit(vit, tmp_path / "vit")
    loaded = load_vit(tmp_path / "vit")
    assert loaded.config.stem == "cnn"
    assert torch.equal(loaded.eval()(pixels), vit(pixels))  # eval: the saved running statistics, not the batch's
    with pytest.raises(ConfigError, match="power-of-two"):
        ViT(EncoderConfig(width=32, depth=1, heads=2, stem="cnn"), 6)
    alone = ViT(EncoderConfig(width=32, depth=0, heads=2, stem="cnn"), 8)  # the CNN with no transformer layers
    assert len(alone.blocks) == 0 and alone(pixels).shape == (2, 6, 6, 32)
    with pytest.raises(ConfigError, match="depth=0"):
        EncoderConfig(width=32, depth=0, heads=2, stem="conv")
