"""The ViT's offline pre-training on the synthetic data: shifted batches keep their labels, it learns and is
deterministic for a seed, and it names missing data."""

import numpy as np
import pytest
import torch

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.synthetic import synthesize
from monovlm.train import vit_pretrain
from monovlm.train.vit_pretrain import _collate, load_patch_dataset, pretrain_vit

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
    shifted_labels = torch.stack([vit_pretrain._shift(s["labels"], dy, dx) for s, (dy, dx) in zip(samples, shifts)])
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
