"""Model against blind per question wording, from a `monovlm eval` report on the second world.

`monovlm eval MODEL --tasks llava --data /tmp/world2/instruct_test.json` keeps every prediction of the model and of
its blind twin (the same questions with a blank image) in report.json. This splits the yes/no questions by wording
(`second_world.wording`: the question with its colour and kind words masked), so one can see which wordings the
model answers from the image and which from the wording alone; shape and colour questions are one row each.

    python benchmarks/answers_by_wording.py runs/eval/final/report.json [--task llava]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from second_world import wording


@dataclass
class Row:
    questions: int = 0
    model_right: float = 0.0
    blind_right: float = 0.0
    same_answer: int = 0

    def cells(self) -> list[str]:
        n = self.questions
        return [str(n), f"{100 * self.model_right / n:.1f}", f"{100 * self.blind_right / n:.1f}",
                f"{100 * self.same_answer / n:.1f}"]


def rows_by_wording(report: list[dict], task: str = "llava") -> dict[str, Row]:
    """wording (or answer group for non-yes/no questions) -> its row, in the report's first setting."""
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
    return dict(rows)


def markdown(rows: dict[str, Row]) -> str:
    lines = ["| wording | questions | model | blind | same answer as blind |", "|---|---:|---:|---:|---:|"]
    for key, row in sorted(rows.items(), key=lambda item: -item[1].questions):
        lines.append("| " + " | ".join([key, *row.cells()]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a monovlm eval report.json (run with the blind baseline)")
    parser.add_argument("--task", default="llava")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if not report or not report[0].get("blind"):
        raise SystemExit(f"{args.report}: no blind results (run monovlm eval with --blind, the default)")
    print(markdown(rows_by_wording(report, args.task)))


if __name__ == "__main__":
    main()
