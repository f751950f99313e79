"""benchmarks/caption_words.py: scores the word each attribute position predicts, and runs on the shipped model."""

import json
import subprocess
import sys
from pathlib import Path
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from monovlm.data.synthetic import COLORS, KINDS, SIZES, synthesize
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.tokenizer import Tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "caption_words.py"


class NextTokenModel(torch.nn.Module):
    """Predicts, at every position, the token that really comes next (or always `constant`)."""

    def __init__(self, vision, vocab: int, constant: int | None = None):
        super().__init__()
        self.config = SimpleNamespace(vision=vision)
        self.vocab, self.constant = vocab, constant

    def forward(self, input_ids, images=None):
        targets = torch.roll(input_ids, -1, dims=1) if self.constant is None else torch.full_like(input_ids,
                                                                                                  self.constant)
        return torch.nn.functional.one_hot(targets, self.vocab).float()  # (B, T, vocab)


def test_accuracy_reads_the_prediction_made_one_position_before_each_word(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from caption_words import caption_word_accuracy

    from monovlm.model.vlm import EncoderFreeVLM

    synthesize(tmp_path, n=40, seed=0, maze_fraction=0.0, progress=False)
    scenes = [r for r in json.loads((tmp_path / "scenes.json").read_text()) if r["split"] == "test"]
    tokenizer = Tokenizer.from_folder(DEFAULT_MODEL_DIR)
    vision = EncoderFreeVLM.load(DEFAULT_MODEL_DIR).config.vision
    shapes = [shape for scene in scenes for shape in scene["shapes"]]
    oracle = caption_word_accuracy(NextTokenModel(vision, tokenizer.vocab_size), tokenizer, tmp_path, scenes)
    assert {a: (acc, n) for a, (acc, _, n) in oracle.items()} == {a: (1.0, len(shapes)) for a in oracle}
    circle = tokenizer.encode(" circle")[0]
    constant = caption_word_accuracy(NextTokenModel(vision, tokenizer.vocab_size, circle), tokenizer, tmp_path, scenes)
    circles = sum(shape["kind"] == "circle" for shape in shapes)
    assert constant["kind"][0] == circles / len(shapes) and constant["color"][0] == 0.0


@pytest.mark.slow  # benchmark script run
def test_script_runs_on_the_shipped_model(tmp_path):
    synthesize(tmp_path, n=40, seed=0, maze_fraction=0.0, progress=False)
    output = subprocess.run([sys.executable, str(SCRIPT), "--model", "default", "--data", str(tmp_path),
                             "--scenes", "5"], capture_output=True, text=True, check=True).stdout
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip() for row in rows] == ["attribute", "color", "size", "kind"]
    # the words it scored and the commonest word's share, counted here from the same captions
    scenes = [r for r in json.loads((tmp_path / "scenes.json").read_text())
              if r["type"] == "scene" and r["split"] == "test"][:5]
    words = " ".join(r["caption"] for r in scenes).replace(",", " ").replace(".", " ").split()
    vocabularies = {"color": set(COLORS), "size": set(SIZES), "kind": set(KINDS)}
    for row in rows[1:]:
        counts = Counter(word for word in words if word in vocabularies[row[0].strip()])
        assert int(row[1]) == sum(counts.values()) > 0
        assert float(row[3]) == round(100 * max(counts.values()) / sum(counts.values()), 1)
        assert 0.0 <= float(row[2]) <= 100.0
