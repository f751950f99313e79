"""Ablation: EVE with and without the patch-align loss, and the encoder-based (LLaVA-style) baseline, at equal
training FLOPs, on the synthetic suite. Writes per-category accuracy against steps (JSON + PNG) and a Markdown table.

    python benchmarks/ablation_align.py --out runs/ablation            # ~30-40 min on 2 CPU cores

FLOPs follow the trainer's convention (6·N per trained token over all parameters in the forward pass, plus 2·N per
image token for a teacher's forward). The runs share data, seeds, model sizes and the first stages; the last
(instruction) stage of each run gets as many steps as fit the budget set by the EVE-with-align run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from monovlm.data.synthetic import synthesize
from monovlm.train.recipe import load_recipe
from monovlm.train.trainer import TrainOptions, train


def variants(eval_every: int, scale: float):
    eve = load_recipe("eve")
    no_align = copy.deepcopy(eve)
    no_align.name = "eve-no-align"
    no_align.align = None
    for stage in no_align.stages:
        stage.align = False
        stage.train = [p for p in stage.train if p != "align"]
    llava = load_recipe("llava")
    runs = {"eve": eve, "eve-no-align": no_align, "llava": llava}
    for recipe in runs.values():
        for stage in recipe.stages:
            stage.steps = max(1, int(stage.steps * scale))
        recipe.stages[-1].eval_every = eval_every
    return runs


def run_flops(run_dir: Path) -> tuple[list[dict], float]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [s for s in steps if "eval" in s]
    train_steps = [s for s in steps if "loss" in s]
    return evals, sum(s.get("flops", 0.0) for s in train_steps)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for evals in results.values() for e in evals for c in e["eval"] if c != "overall"})
    panels = categories + ["overall"]
    columns = 4
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, category in zip(axes.flat, panels):
        for name, evals in results.items():
            xs = [e["flops"] / 1e12 for e in evals]
            ys = [100 * e["eval"].get(category, float("nan")) for e in evals]
            axis.plot(xs, ys, marker="o", label=name)
        axis.set_title(category)
        axis.set_xlabel("training TFLOPs")
        axis.set_ylabel("accuracy %")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=80)
    parser.add_argument("--eval-limit", type=int, default=600)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "summary.json").is_file():
        synthesize(data, n=args.n, seed=0, progress=False)
    runs = variants(args.eval_every, args.scale)
    results: dict[str, list[dict]] = {}
    budget = None
    for name, recipe in runs.items():
        run_dir = args.out / name
        started = time.perf_counter()
        options = TrainOptions(recipe=recipe, data_root=data, run_dir=run_dir, eval_limit=args.eval_limit,
                               progress=False, flops_budget=budget)
        train(options)
        evals, total = run_flops(run_dir)
        budget = budget or total  # the first run (EVE with align) sets the budget for the others
        print(f"{name}: {total / 1e12:.2f} TFLOPs in {(time.perf_counter() - started) / 60:.1f} min; "
              f"final {evals[-1]['eval'] if evals else {}}")
        results[name] = evals
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "ablation.png")
    categories = sorted({c for evals in results.values() for e in evals for c in e["eval"]})
    lines = ["| run | TFLOPs | " + " | ".join(categories) + " |", "|---|---:|" + "---:|" * len(categories)]
    for name, evals in results.items():
        final = evals[-1]
        lines.append(f"| {name} | {final['flops'] / 1e12:.2f} | "
                     + " | ".join(f"{100 * final['eval'].get(c, float('nan')):.1f}" for c in categories) + " |")
    table = "\n".join(lines)
    (args.out / "ablation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
