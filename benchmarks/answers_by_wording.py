"""Model against blind per question wording, from a `monovlm eval` report on the second world.

`monovlm eval MODEL --tasks llava --data /tmp/world2/instruct_test.json` keeps every prediction of the model and of
its blind twin (the same questions with a blank image) in report.json. This splits the yes/no questions by wording
(`second_world.wording`: the question with its colour and kind words masked), so one can see which wordings the
model answers from the image and which from the wording alone; shape and colour questions are one row each.

The blind twin is not the wording's prior: a model that looks answers "no" to "Is there a red star?" about a blank
image, which is right for the blank image and mostly wrong for the test's. With `--train` (the training file), a
column "prior" scores each question's most frequent training answer for its wording: the accuracy of answering from
the wording alone, the figure a model has to beat by reading the image (a wording the training file never asks
scores 0).

    python benchmarks/answers_by_wording.py runs/eval/final/report.json [--task llava] [--train DATA/instruct.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from monovlm.data.processor import IMAGE_MARKER
from second_world import wording


@dataclass
class Row:
    questions: int = 0
    model_right: float = 0.0
    blind_right: float = 0.0
    same_answer: int = 0
    prior_right: int | None = None  # questions the wording's most frequent training answer gets right

    def cells(self) -> list[str]:
        n = self.questions
        prior = [] if self.prior_right is None else [f"{100 * self.prior_right / n:.1f}"]
        return [str(n), f"{100 * self.model_right / n:.1f}", f"{100 * self.blind_right / n:.1f}",
                f"{100 * self.same_answer / n:.1f}", *prior]


def wording_priors(records: list[dict]) -> dict[str, str]:
    """wording -> its most frequent answer over a LLaVA file's (question, answer) turns."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        turns = record.get("conversations", [])
        for question, answer in zip(turns[::2], turns[1::2]):
            text = question["value"].replace(IMAGE_MARKER, "").strip()
            answers[wording(text)][answer["value"].strip().lower()] += 1
    return {key: counts.most_common(1)[0][0] for key, counts in answers.items()}


def rows_by_wording(report: list[dict], task: str = "llava", priors: dict[str, str] | None = None) -> dict[str, Row]:
    """wording (or answer group for non-yes/no questions) -> its row, in the report's first setting; with `priors`
    (`wording_priors`), each row also counts the questions its wording's prior answer gets right."""
    entry = report[0]
    model = next(result for result in entry["results"] if result["task"] == task)
    blind = next(result for result in entry["blind"] if result["task"] == task)
    rows: dict[str, Row] = defaultdict(Row)
    for answered, blank in zip(model["predictions"], blind["predictions"], strict=True):
        if answered["id"] != blank["id"]:
            raise ValueError(f"model and blind predictions are not in the same order ({answered['id']}, {blank['id']})")
        key = wording(answered["question"]) if answered["group"] == "yes/no" else answered["group"]
        row = rows[key]
        row.questions += 1
        row.model_right += answered["score"]
        row.blind_right += blank["score"]
        row.same_answer += answered["prediction"] == blank["prediction"]
        if priors is not None:
            prior = priors.get(wording(answered["question"]))
            row.prior_right = (row.prior_right or 0) + (prior in {a.strip().lower() for a in answered["answers"]})
    return dict(rows)


def markdown(rows: dict[str, Row]) -> str:
    with_prior = any(row.prior_right is not None for row in rows.values())
    lines = ["| wording | questions | model | blind | same answer as blind |" + (" prior |" if with_prior else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if with_prior else "")]
    for key, row in sorted(rows.items(), key=lambda item: -item[1].questions):
        lines.append("| " + " | ".join([key, *row.cells()]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a monovlm eval report.json (run with the blind baseline)")
    parser.add_argument("--task", default="llava")
    parser.add_argument("--train", type=Path, help="the training file (LLaVA JSON): adds each wording's prior")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if not report or not report[0].get("blind"):
        raise SystemExit(f"{args.report}: no blind results (run monovlm eval with --blind, the default)")
    priors = wording_priors(json.loads(args.train.read_text())) if args.train else None
    print(markdown(rows_by_wording(report, args.task, priors)))


if __name__ == "__main__":
    main()
