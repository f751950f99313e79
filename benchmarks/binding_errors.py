"""Colour and shape answers on the second world, split by how many shapes the image holds and by what a wrong
answer names: another shape's attribute in the same image (the model saw the attributes but not which shape has
which: a binding error) or an attribute absent from the image (it misread the pixels).

Reads `monovlm eval ... --tasks llava` reports of the second world's test questions and rebuilds each test scene
from the generator (`second_world.sample_scene`, the same seed), so it needs no side file:

    python benchmarks/binding_errors.py RUN_EVAL/report.json [MORE/report.json ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_world  # noqa: E402  benchmarks/second_world.py

ATTRIBUTE = {"colour": "colour", "shape": "kind"}  # question group -> the Shape attribute its answer names


def test_scene(index: int, seed: int, size: int = 64) -> second_world.Scene:
    """The scene of test image `index`, as `second_world.generate` drew it."""
    key = [seed, second_world.SPLITS["test"], index, second_world._SCENE]
    return second_world.sample_scene(np.random.default_rng(key), size)


def split_answers(predictions: list[dict], seed: int, size: int = 64) -> dict[tuple[str, str], Counter]:
    """(group, shape count "1" / "2" / "3+") -> Counter of questions, right, other (wrong: another shape's
    attribute in the image), absent (wrong: an attribute no shape in the image has)."""
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for prediction in predictions:
        group = prediction["group"]
        if group not in ATTRIBUTE:
            continue
        index = int(prediction["id"].split("_")[1])  # test_00012_q3 -> 12
        scene = test_scene(index, seed, size)
        present = {getattr(shape, ATTRIBUTE[group]) for shape in scene.shapes}
        count = len(scene.shapes)
        row = table[(group, "3+" if count >= 3 else str(count))]
        row["questions"] += 1
        if prediction["score"] == 1.0:
            row["right"] += 1
        elif prediction["prediction"] in present:
            row["other"] += 1
        else:
            row["absent"] += 1
    return table


def markdown(name: str, table: dict[tuple[str, str], Counter]) -> str:
    lines = [name, "", "| question | shapes in the image | questions | right | wrong: another shape's | "
             "wrong: absent from the image |", "|---|---|---:|---:|---:|---:|"]
    for (group, count), row in sorted(table.items()):
        total = row["questions"]
        lines.append(f"| {group} | {count} | {total} | {100 * row['right'] / total:.1f}% | "
                     f"{100 * row['other'] / total:.1f}% | "
                     f"{100 * row['absent'] / total:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files of `monovlm eval --tasks llava`")
    parser.add_argument("--seed", type=int, default=0, help="the second world's --seed")
    parser.add_argument("--size", type=int, default=64, help="the second world's image size")
    args = parser.parse_args()
    for path in args.reports:
        report = json.loads(path.read_text())
        result = next(r for r in report[0]["results"] if not r.get("blind"))
        print(markdown(str(path), split_answers(result["predictions"], args.seed, args.size)) + "\n")


if __name__ == "__main__":
    main()
