"""benchmarks/answers_by_wording.py: model against blind per second-world wording, from an eval report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "answers_by_wording.py"


def prediction(index: int, question: str, group: str, prediction: str, answer: str) -> dict:
    return {"id": f"q{index}", "group": group, "question": question, "output": prediction,
            "prediction": prediction, "answers": [answer], "score": float(prediction == answer)}


def report(model: list[dict], blind: list[dict]) -> list[dict]:
    return [{"model": "m", "setting": [], "read_skips": [],
             "results": [{"task": "llava", "predictions": model}], "blind": [{"task": "llava", "predictions": blind}]}]


QUESTIONS = [  # (question, group, answer, the model's answer, the blind twin's)
    ("Is there a red star?", "yes/no", "yes", "yes", "yes"),
    ("Is there a blue ring?", "yes/no", "no", "no", "yes"),
    ("Is there a green cross?", "yes/no", "no", "yes", "yes"),
    ("Is there no red star?", "yes/no", "no", "no", "no"),
    ("What shape is the red object?", "shape", "star", "star", "ring"),
]


def test_rows_split_yes_no_by_wording(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from answers_by_wording import rows_by_wording

    model = [prediction(i, q, g, mine, answer) for i, (q, g, answer, mine, _) in enumerate(QUESTIONS)]
    blind = [prediction(i, q, g, blank, answer) for i, (q, g, answer, _, blank) in enumerate(QUESTIONS)]
    rows = rows_by_wording(report(model, blind))
    assert set(rows) == {"Is there a {c} {k}?", "Is there no {c} {k}?", "shape"}
    there = rows["Is there a {c} {k}?"]
    assert (there.questions, there.model_right, there.blind_right, there.same_answer) == (3, 2.0, 1.0, 2)
    assert rows["shape"].cells() == ["1", "100.0", "0.0", "0.0"]
    with pytest.raises(ValueError, match="same order"):
        rows_by_wording(report(model, blind[::-1]))

    path = tmp_path / "report.json"
    path.write_text(json.dumps(report(model, blind)))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=True).stdout
    assert "| Is there a {c} {k}? | 3 | 66.7 | 33.3 | 66.7 |" in out
    assert "prior" not in out


def test_prior_column_scores_each_wordings_most_frequent_training_answer(tmp_path):
    """--train: the wording's most frequent answer in the training file, scored on the row's questions."""
    def record(question: str, answer: str) -> dict:
        return {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                    {"from": "gpt", "value": answer}]}

    train = [record("Is there a blue star?", "yes"), record("Is there a red ring?", "yes"),
             record("Is there a green hexagon?", "no"), record("Is there no red star?", "no"),
             record("What shape is the red object?", "ring"), record("What shape is the blue object?", "ring")]
    model = [prediction(i, q, g, mine, answer) for i, (q, g, answer, mine, _) in enumerate(QUESTIONS)]
    blind = [prediction(i, q, g, blank, answer) for i, (q, g, answer, _, blank) in enumerate(QUESTIONS)]
    (tmp_path / "report.json").write_text(json.dumps(report(model, blind)))
    (tmp_path / "train.json").write_text(json.dumps(train))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "report.json"), "--train",
                          str(tmp_path / "train.json")], capture_output=True, text=True, check=True).stdout
    assert "| wording | questions | model | blind | same answer as blind | prior |" in out
    assert "| Is there a {c} {k}? | 3 | 66.7 | 33.3 | 66.7 | 33.3 |" in out  # "yes" right once of three
    assert "| Is there no {c} {k}? | 1 | 100.0 | 100.0 | 100.0 | 100.0 |" in out
    assert "| shape | 1 | 100.0 | 0.0 | 0.0 | 0.0 |" in out  # "ring", the answer is "star"
