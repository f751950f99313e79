"""The ViT's offline pre-training. "mae" (masked patch prediction) on a user's LLaVA folder without scenes.json: the
loss counts hidden patches only, it learns, is deterministic for a seed, skips unreadable images and names missing
data. "labels" on the synthetic data: shifted batches keep their labels, it learns and is deterministic."""


import numpy as np
import pytest
import torch
from image_folder import write_llava_folder

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.datasets import DatasetError
from monovlm.data.image_files import DataImage
from monovlm.data.images import patchify, shift_image
from monovlm.data.synthetic import synthesize
from monovlm.model.vit import ViT
from monovlm.train.vit_pretrain import (
    MAEDecoder,
    _collate,
    load_patch_dataset,
    masked_patch_loss,
    pretrain_vit,
    pretrain_vit_mae,
)

TINY = EncoderConfig(width=32, depth=2, heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    synthesize(folder, n=60, seed=0, image_size=32, progress=False)
    return folder


def test_shifted_batches_keep_labels_and_centres_on_their_shapes(synthetic):
    vision = VisionConfig(patch_size=8, merge=1)
    samples = [s for s in load_patch_dataset(synthetic, vision, "train") if s["centres"]][:8]
    shifts = [(3, -4), (-4, 2), (0, 0), (4, 4), (-1, -3), (2, 0), (0, -2), (1, 1)][:len(samples)]
    batch = _collate(samples, 8, shifts)
    for image, row, col, colour, kind in batch["centres"].tolist():
        assert batch["kind"][image, row, col, kind] > 0 and batch["colour"][image, row, col, colour] > 0
    # pixels and labels move together: every coloured pixel still carries a colour label
    shifted_labels = torch.stack([shift_image(s["labels"], dy, dx) for s, (dy, dx) in zip(samples, shifts)])
    grey = (batch["pixels"] == batch["pixels"][:, :1]).all(1)
    assert torch.equal(~grey, shifted_labels[:, 0] > 0)


def test_tiny_pretraining_learns_and_is_deterministic(synthetic):
    vision = VisionConfig(patch_size=8, merge=1)
    config = EncoderConfig(width=32, depth=1, heads=2, mlp_ratio=2.0)
    runs = []
    for seed, steps in ((0, 30), (0, 30), (1, 3)):
        report = {}
        vit = pretrain_vit(synthetic, config, vision, steps=steps, objective="labels", batch_size=8, lr=3e-3,
                           seed=seed, progress=False, report=report)
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


def test_labels_objective_needs_scenes(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        pretrain_vit(tmp_path, TINY, VisionConfig(patch_size=8, merge=1), steps=1, objective="labels", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# "mae" on a user's folder


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    return write_llava_folder(tmp_path_factory.mktemp("user"), n=16, size=(32, 32))


class Oracle(MAEDecoder):
    """A decoder that predicts every patch exactly (it is handed the target): the loss is then 0."""

    def __init__(self, target, *args):
        super().__init__(*args)
        self.target = target

    def forward(self, visible, keep, rows, cols):
        return self.target + 0.0 * self.embed(visible).sum()


def test_masked_patch_loss_counts_the_hidden_patches_only():
    torch.manual_seed(0)
    vit = ViT(TINY, patch_size=8)
    pixels = torch.randn(3, 3, 16, 32)  # 2 × 4 = 8 patches, 6 hidden at 0.75
    decoder = MAEDecoder(32, 16, 1, 2, 8)
    error, count = masked_patch_loss(vit, decoder, pixels, 0.75, torch.Generator().manual_seed(0))
    assert count == 3 * 6 * 8 * 8 * 3 and error > 0
    target = patchify(pixels, 8).reshape(3, 8, -1)
    exact, _ = masked_patch_loss(vit, Oracle(target, 32, 16, 1, 2, 8), pixels, 0.75)
    assert exact == 0
    # wrong only on patch 0 of image 0: the error is there exactly when that patch was hidden
    wrong = target.clone()
    wrong[0, 0] += 1.0
    errors = {masked_patch_loss(vit, Oracle(wrong, 32, 16, 1, 2, 8), pixels, 0.75,
                                torch.Generator().manual_seed(seed))[0].item() for seed in range(20)}
    assert errors == {0.0, 8 * 8 * 3.0}  # visible in some draws (not counted), hidden in others (counted in full)
    loss, count = masked_patch_loss(vit, decoder, torch.randn(1, 3, 8, 8), 0.75)  # one patch: reconstructed
    assert count == 8 * 8 * 3 and loss > 0


def test_mae_pretraining_on_a_folder_without_labels_learns_and_is_deterministic(user_folder):
    assert not (user_folder / "scenes.json").exists()
    vision = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)
    config = EncoderConfig(width=32, depth=1, heads=2, mlp_ratio=2.0)
    runs = []
    for seed, steps in ((0, 40), (0, 40), (1, 3)):
        report = {}
        vit = pretrain_vit(user_folder, config, vision, steps=steps, sources=["captions.json", ("qa.json", None)],
                           batch_size=8, lr=3e-3, seed=seed, progress=False, report=report)
        runs.append((vit, report))
    (vit_a, report_a), (vit_b, report_b), (_, report_c) = runs
    losses = report_a["losses"]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert report_a["images"] == 16  # both files name the same 16 images: each read once
    assert report_a["losses"] == report_b["losses"]
    for name, tensor in vit_a.state_dict().items():
        assert torch.equal(tensor, vit_b.state_dict()[name]), name
    assert report_c["losses"][0] != report_a["losses"][0]
    assert not vit_a.training


def test_mae_pretraining_skips_unreadable_images_and_names_missing_data(user_folder, tmp_path):
    vision = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)
    images = [DataImage(f"photos/img_{i:02d}.png", user_folder / f"photos/img_{i:02d}.png") for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = {}
    pretrain_vit_mae([*images, DataImage("broken.png", broken)], TINY, vision, steps=3, batch_size=4,
                     progress=False, report=report)
    assert report["images"] == 3 and "1 × image unreadable" in report["skipped"]
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        pretrain_vit_mae([DataImage("broken.png", broken)], TINY, vision, steps=1, progress=False)
    with pytest.raises(DatasetError, match="nothere.json"):
        pretrain_vit(user_folder, TINY, vision, steps=1, sources=["nothere.json"], progress=False)
    with pytest.raises(ValueError, match="data files"):
        pretrain_vit(user_folder, TINY, vision, steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown ViT pretraining objective 'clip'"):
        pretrain_vit(user_folder, TINY, vision, steps=1, objective="clip", sources=["captions.json"])
    with pytest.raises(ValueError, match="mask_ratio"):
        pretrain_vit_mae(images, TINY, vision, steps=1, mask_ratio=1.0)


def test_llava_baseline_encoder_pretrains_on_a_users_folder(user_folder):
    """encoder_init = "mae" reads the recipe's data files; "labels" needs the synthetic scenes and says so."""
    from monovlm.train.build import build_model
    from monovlm.train.recipe import recipe_from_dict

    def recipe(init):
        return recipe_from_dict({
            "name": "baseline", "model": {
                "vocab_size": 300, "encoder_init": init, "encoder_steps": 2,
                "encoder": {"width": 32, "depth": 1, "heads": 2},
                "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                            "num_kv_heads": 1},
                "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "max_pixels": 32 * 32}},
            "stages": [{"name": "caption", "data": "captions.json", "template": "plain"}]})

    random_model, _ = build_model(recipe("random"), user_folder)
    model, _ = build_model(recipe("mae"), user_folder)
    random_weights = random_model.embedder.encoder.state_dict()
    assert any(not torch.equal(t, random_weights[n]) for n, t in model.embedder.encoder.state_dict().items())
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        build_model(recipe("labels"), user_folder)
    with pytest.raises(ValueError, match="encoder_init='clip' is not one of"):
        build_model(recipe("clip"), user_folder)
