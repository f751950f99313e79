"""benchmarks/existence_evidence.py: groups absent objects by what the image holds of them, AUC with ties, runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monovlm.data.synthetic import synthesize

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "existence_evidence.py"
sys.path.insert(0, str(SCRIPT.parent))
from existence_evidence import GROUPS, POSITIVE, asked_object, auc, evidence_group  # noqa: E402

SHAPES = [{"color": "red", "kind": "circle"}, {"color": "blue", "kind": "square"}]


@pytest.mark.parametrize("question, group", [
    ("Is there a red circle in the image?", POSITIVE),
    ("Is there a red square in the image?", "colour and kind on other shapes"),
    ("Is there a red cross in the image?", "colour only"),
    ("Is there an orange square in the image?", "kind only"),
    ("Is there a green triangle in the image?", "neither"),
])
def test_groups_say_what_the_image_holds_of_the_asked_object(question, group):
    assert group in GROUPS and evidence_group(question, SHAPES) == group


def test_other_questions_are_refused():
    assert asked_object("Is there an orange cross in the image?") == ("orange", "cross")
    for question in ("How many red shapes are there?", "Is there a pink circle in the image?",
                     "Is there a red blob in the image?"):
        with pytest.raises(ValueError, match="not a synthetic existence question"):
            asked_object(question)


def test_auc_counts_ties_half_and_is_nan_without_a_side():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
    assert auc(torch.tensor([]), torch.tensor([1.0])) != auc(torch.tensor([]), torch.tensor([1.0]))  # NaN


@pytest.mark.slow  # benchmark script run
def test_script_runs_on_the_shipped_model(tmp_path):
    synthesize(tmp_path, n=40, seed=0, maze_fraction=0.3, progress=False)
    output = subprocess.run([sys.executable, str(SCRIPT), "--model", "default", "--data", str(tmp_path),
                             "--limit", "12"], capture_output=True, text=True, check=True).stdout
    assert output.startswith("12 test existence questions")
    rows = [line.strip("|").split("|") for line in output.splitlines()[2:] if line.startswith("| ")]
    assert rows and rows[0][0].strip() == POSITIVE and {row[0].strip() for row in rows} <= set(GROUPS)
    assert sum(int(row[1]) for row in rows) == 12
    for row in rows[1:]:
        assert 0.0 <= float(row[3]) <= 1.0 and 0.0 <= float(row[5]) <= 1.0
    # the shipped model looks: with the real image it leans to "yes" for objects that are there, far more than with a
    # blank image (where it says "no" with confidence)
    assert float(rows[0][2]) > float(rows[0][4]) + 1.0
