"""benchmarks/probe_visual_tokens.py runs end to end on tiny data, and its probe learns what the features hold."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monovlm.data.synthetic import synthesize

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "probe_visual_tokens.py"


def _rows(output: str) -> dict[str, list[float]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("kind", "color"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_probe_accuracy_learns_a_separable_label_and_not_noise():
    sys.path.insert(0, str(SCRIPT.parent))
    from probe_visual_tokens import probe_accuracy

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator)
    is_test = torch.arange(400) >= 300
    separable = (features[:, 3] > 0).long()
    noise = torch.randint(0, 2, (400,), generator=generator)
    assert probe_accuracy(features, separable, is_test) > 0.8  # 0.89: 300 train rows, 15 noise features
    assert probe_accuracy(features, noise, is_test) < 0.65
    xor = ((features[:, 3] > 0) ^ (features[:, 5] > 0)).long()  # not linearly separable
    assert probe_accuracy(features, xor, is_test, steps=600) > 0.7
    assert probe_accuracy(features, xor, is_test, steps=600, linear=True) < 0.65
    assert probe_accuracy(features, separable, is_test, linear=True) > 0.8


@pytest.mark.slow  # benchmark script runs
def test_script_on_pixels_and_on_the_shipped_model(tmp_path):
    synthesize(tmp_path, n=60, seed=0, maze_fraction=0.0, progress=False)
    pixels = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--pixels", "10"],
                            capture_output=True, text=True, check=True).stdout
    rows = _rows(pixels)
    assert set(rows) == {"kind", "color"} and all(len(r) == 2 for r in rows.values())
    assert rows["color"][1] > rows["color"][0] + 30  # the pixels give the colour away; the prior does not
    model = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--model", "default",
                            "--scenes", "20"], capture_output=True, text=True, check=True).stdout
    assert "| attribute | prior | embedder | layer 1 | layer 2 | layer 3 | layer 4 |" in model
    assert all(len(r) == 6 for r in _rows(model).values())
    # a (random, tiny) ViT teacher folder: one column of the teacher's patch features
    from monovlm.config import EncoderConfig
    from monovlm.model.vit import ViT, save_vit

    torch.manual_seed(0)
    save_vit(ViT(EncoderConfig(width=32, depth=1, heads=2), patch_size=8), tmp_path / "teacher")
    teacher = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path), "--teacher",
                              str(tmp_path / "teacher"), "--scenes", "20"], capture_output=True, text=True,
                             check=True).stdout
    assert "| attribute | prior | teacher |" in teacher and all(len(r) == 2 for r in _rows(teacher).values())
