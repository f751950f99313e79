"""Ablation: EVE with and without the patch-align loss, and the encoder-based (LLaVA-style) baseline, trained on the
same synthetic data (recipes `eve-synthetic`, `llava-synthetic`) — with `--equal-flops`, at equal training FLOPs —
and evaluated per category beside each model's blind baseline (the same model answering with blank images).

    python benchmarks/ablation_align.py --out runs/ablation --equal-flops --write   # ~1 h on 2 CPU cores

Equal FLOPs: benchmarks/flops_budget.py predicts, before training, each recipe's FLOPs exactly as the trainer will
count them (per stage and step), and lengthens or shortens the LAST (instruction) stage of each run so its total comes
nearest to the budget — by default the largest recipe's default total, so that run keeps its recipe's length; the
earlier stages and every schedule stay as written (the last stage's cosine spans its new length). `--count` picks
the FLOPs that are made equal: `trainer` (its per-token convention: 6·N per trained weight, 4·N or 2·N per frozen
one, see monovlm/train/flops.py) or `measured` (torch's FLOP counter on the first steps of each stage, which sees
that LLaVA's encoder runs per image patch and that EVE's teacher reads every image patch). Both figures are reported
for every run either way.

Writes, under --out (git-ignored runs/ by default): ablation.json (everything), ablation.md (the table),
ablation.png (final accuracy per category per run, blind baselines marked), ablation_curves.png (accuracy against
training TFLOPs at each eval). `--write [BENCHMARKS.md]` replaces the ablation section of that file and nothing else.

A smoke test at toy size (~10 min on 2 busy cores):
`--out runs/ablation_smoke --n 60 --scale 0.02 --pretrain-steps 3 --eval-limit 16 --measure-steps 1 --equal-flops`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import shutil
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import torch
from flops_budget import FlopsPlan, FlopsPlanner  # benchmarks/flops_budget.py (the script's own folder)
from sections import replace_section  # benchmarks/sections.py (the script's own folder)

from monovlm.data.processor import Processor
from monovlm.quickstart import ensure_data
from monovlm.train.recipe import Recipe, load_recipe
from monovlm.train.trainer import TrainOptions, train

SECTION = "## Ablation: EVE's align loss, and the encoder-based baseline"  # the section --write replaces
NOTES_MARKER = "<!-- notes below this line are kept when ablation_align.py --write rewrites the section -->"
LABELS = {"eve": "eve (align loss, cosine, ViT teacher)", "eve-no-align": "eve without align loss",
          "llava": "llava (pretrained ViT + projector)"}


def variants(eval_every: int, scale: float, pretrain_steps: int | None = None, seed: int = 0) -> dict[str, Recipe]:
    eve = load_recipe("eve-synthetic")  # the quickstart's recipe; the drills and mixture fit the synthetic data
    no_align = copy.deepcopy(eve)
    no_align.name = "eve-no-align"
    no_align.align = None
    for stage in no_align.stages:
        stage.align = False
        stage.train = [p for p in stage.train if p != "align"]
    llava = load_recipe("llava-synthetic")
    runs = {"eve": eve, "eve-no-align": no_align, "llava": llava}
    for recipe in runs.values():
        recipe.seed = seed  # initialisation, teacher/encoder pretraining and batch order
        for stage in recipe.stages:
            stage.steps = max(1, int(stage.steps * scale))
            stage.warmup_steps = min(stage.warmup_steps, stage.steps)
        recipe.stages[-1].eval_every = eval_every
        if pretrain_steps is not None:  # the ViT teacher's and the baseline encoder's pretraining (toy runs only)
            recipe.model.encoder_steps = pretrain_steps
            if recipe.align is not None:
                recipe.align.teacher_steps = pretrain_steps
    return runs


# -------------------------------------------------------------------------------------------------------------------
# planning


def plan_runs(runs: dict[str, Recipe], data: Path, equal_flops: bool, count: str, budget: float | None,
              measure_steps: int) -> tuple[dict[str, FlopsPlan], dict[str, FlopsPlan], float | None]:
    """(default plans, plans to train, budget). Without equal_flops the plans to train are the recipes as written."""
    planners = {name: FlopsPlanner(recipe, data) for name, recipe in runs.items()}
    defaults = {}
    for name, planner in planners.items():
        defaults[name] = planner.plan()
        if measure_steps > 0:
            started = time.perf_counter()
            defaults[name].ratios = planner.measured_ratios(measure_steps)
            print(f"measured FLOPs of {name} in {time.perf_counter() - started:.0f} s")
        print("default " + defaults[name].summary())
    if not equal_flops:
        return defaults, defaults, None
    if count == "measured" and measure_steps <= 0:
        raise SystemExit("--count measured needs --measure-steps > 0")

    def total(plan: FlopsPlan) -> float:
        return plan.measured_total if count == "measured" else plan.total

    budget = budget if budget is not None else max(total(plan) for plan in defaults.values())
    fitted = {}
    for name, planner in planners.items():
        ratios = defaults[name].ratios
        fitted[name] = planner.fit(budget, ratios if count == "measured" else None)
        fitted[name].ratios = ratios
        print("planned " + fitted[name].summary())
    return defaults, fitted, budget


# -------------------------------------------------------------------------------------------------------------------
# training and evaluation


def stage_flops(run_dir: Path) -> tuple[list[float], list[dict]]:
    """(the trainer's FLOPs per stage in order, its eval records) from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_stage: dict[str, float] = {}
    for record in records:
        if "loss" in record:
            per_stage[record["stage"]] = per_stage.get(record["stage"], 0.0) + record.get("flops", 0.0)
    return list(per_stage.values()), [r for r in records if "eval" in r]


def train_and_evaluate(name: str, plan: FlopsPlan, data: Path, out: Path, eval_limit: int) -> dict:
    from monovlm.eval.protocol import ModelRunner
    from monovlm.eval.report import evaluate_model

    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale teacher or checkpoint from an earlier (e.g. toy) run must not be reused
    started = time.perf_counter()
    result = train(TrainOptions(recipe=plan.recipe, data_root=data, run_dir=run_dir, eval_limit=eval_limit,
                                progress=False))
    minutes = (time.perf_counter() - started) / 60
    flops, curve = stage_flops(run_dir)
    model = result.model
    processor = Processor(result.tokenizer, model.config.vision, model.config.processor)
    final = evaluate_model(ModelRunner(model, processor, name=name), ["synthetic"], data, limit=eval_limit,
                           progress=False)
    model_result, blind_result = final.results[0], final.blind[0]
    measured = sum(r * f for r, f in zip(plan.ratios, flops)) if plan.ratios is not None else None
    record = {
        "name": name, "label": LABELS.get(name, name), "minutes": round(minutes, 2),
        "steps": {stage.name: stage.steps for stage in plan.recipe.stages},
        "tflops": sum(flops) / 1e12, "tflops_per_stage": [f / 1e12 for f in flops],
        "tflops_planned": plan.total / 1e12,
        "tflops_measured": measured / 1e12 if measured is not None else None,
        "measured_ratios": plan.ratios,
        "accuracy": model_result.headline(), "blind": blind_result.headline(), "counts": model_result.counts,
        "curve": curve,
    }
    print(f"{name}: {record['tflops']:.4g} TFLOPs (planned {record['tflops_planned']:.4g}) in {minutes:.1f} min; "
          f"overall {100 * record['accuracy'].get('overall', float('nan')):.1f}% "
          f"(blind {100 * record['blind'].get('overall', float('nan')):.1f}%)")
    return record


# -------------------------------------------------------------------------------------------------------------------
# report


def categories(records: list[dict]) -> list[str]:
    names = sorted({c for r in records for c in r["accuracy"] if c != "overall"})
    return names + ["overall"]


def _pct(value) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def table(records: list[dict]) -> str:
    columns = categories(records)
    header = ["run", "last-stage steps", "TFLOPs (trainer count)", "TFLOPs (measured, est.)", *columns]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in records:
        steps = list(r["steps"].values())[-1]
        measured = f"{r['tflops_measured']:.1f}" if r["tflops_measured"] is not None else "—"
        lines.append(f"| {r['label']} | {steps} | {r['tflops']:.1f} | {measured} | "
                     + " | ".join(_pct(r["accuracy"].get(c)) for c in columns) + " |")
        lines.append("| ↳ blind (blank images) | | | | "
                     + " | ".join(_pct(r["blind"].get(c)) for c in columns) + " |")
    counts = records[0]["counts"] if records else {}
    lines.append("| questions | | | | " + " | ".join(str(counts.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def plot_bars(records: list[dict], path: Path) -> None:
    """Final accuracy per category, a bar per run; each run's blind baseline as a black tick on its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = categories(records)
    width = 0.8 / max(1, len(records))
    figure, axis = plt.subplots(figsize=(1.6 * len(columns) + 2, 4.2))
    for index, r in enumerate(records):
        xs = [c + (index - (len(records) - 1) / 2) * width for c in range(len(columns))]
        axis.bar(xs, [100 * r["accuracy"].get(c, float("nan")) for c in columns], width,
                 label=f"{r['name']} ({r['tflops']:.1f} TFLOPs)")
        axis.hlines([100 * r["blind"].get(c, float("nan")) for c in columns], [x - width / 2 for x in xs],
                    [x + width / 2 for x in xs], colors="black", linewidth=2,
                    label="blind baseline (blank images)" if index == 0 else None)
    axis.set_xticks(range(len(columns)), columns)
    axis.set_ylabel("exact-match accuracy %")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_curves(records: list[dict], path: Path, x: str = "flops") -> None:
    """Accuracy per category at each of the trainer's evals, against training TFLOPs (x="flops") or optimizer steps
    over all stages (x="steps")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = categories(records)
    columns = 4
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, category in zip(axes.flat, panels):
        for r in records:
            xs = [e["flops"] / 1e12 if x == "flops" else e["global_step"] for e in r["curve"]]
            ys = [100 * e["eval"].get(category, float("nan")) for e in r["curve"]]
            axis.plot(xs, ys, marker="o", label=r["name"])
        axis.set_title(category)
        axis.set_xlabel("training TFLOPs (trainer count)" if x == "flops" else "optimizer steps (all stages)")
        axis.set_ylabel("accuracy %")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_plots(records: list[dict], out: Path) -> None:
    plot_bars(records, out / "ablation.png")
    plot_curves(records, out / "ablation_curves.png")
    plot_curves(records, out / "ablation_steps.png", x="steps")


def section(args: argparse.Namespace, records: list[dict], budget: float | None, toy: bool) -> str:
    command = shlex.join(["python", "benchmarks/ablation_align.py", *sys.argv[1:]])
    if budget is None:
        how = ("Each recipe ran as written (no `--equal-flops`): the runs spent different FLOPs, see the TFLOPs "
               "columns.")
    else:
        counted = ("the trainer's count (per token 6·N for trained weights, 4·N for frozen ones behind a trained "
                   "part, 2·N for frozen ones before any, N the decoder + embedder/encoder parameters; plus a "
                   "teacher forward per visual token)" if args.count == "trainer" else
                   "measured FLOPs (torch's FLOP counter on the first steps of each stage, times the trainer's count "
                   "per stage)")
        how = (f"Equal FLOPs: each run's last stage was lengthened or shortened by `benchmarks/flops_budget.py` so its "
               f"training FLOPs — {counted} — come nearest to {budget / 1e12:.1f} TFLOPs "
               + ("(the largest recipe's default total)" if args.flops_budget is None else "(`--flops-budget`)")
               + "; earlier stages as written.")
    measured = (f"\"Measured\" multiplies each stage's trainer count by measured/counted FLOPs on its first "
                f"{args.measure_steps} step(s) (torch FlopCounterMode: matmuls, convolutions, attention)."
                if args.measure_steps > 0 else "FLOPs were not measured (`--measure-steps 0`).")
    heading = f"{SECTION}, at equal training FLOPs" if budget is not None else SECTION
    toy_note = ("**Smoke-test sizes (scaled-down data or steps): these numbers show the script works, they are not "
                "a result.**")
    setting = (f"Command: `{command}` ({args.n} synthetic images, seed {args.seed}; shipped recipes `eve-synthetic`, "
               f"`eve-synthetic` with the align loss removed, `llava-synthetic`). Date: {date.today().isoformat()}; "
               f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. {how}")
    scores = (f"Final exact-match accuracy (%) on the first {args.eval_limit} test questions of the `synthetic` task, "
              f"each model beside its blind baseline (the same model, blank images); TFLOPs actually spent, summed "
              f"from the trainer's metrics. {measured}")
    plots = (f"Plots (not committed): `{args.out / 'ablation.png'}` (accuracy per category per run, blind marked) "
             f", `{args.out / 'ablation_curves.png'}` (accuracy per category against training TFLOPs) and "
             f"`{args.out / 'ablation_steps.png'}` (against optimizer steps); all numbers in "
             f"`{args.out / 'ablation.json'}`.")
    paragraphs = [fill(text) for text in ([toy_note] if toy else []) + [setting, scores]]
    lines = [heading, ""] + [line for text in paragraphs for line in (text, "")] + [table(records), "", fill(plots), "",
                                                                                  NOTES_MARKER, ""]
    return "\n".join(lines)


def fill(text: str) -> str:
    """Wrap a paragraph at BENCHMARKS.md's width, never inside a word or a path."""
    return textwrap.fill(text, width=118, break_long_words=False, break_on_hyphens=False)


# -------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--n", type=int, default=2000, help="synthetic images")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data and of every run (the recipes' own seed is 0)")
    parser.add_argument("--eval-every", type=int, default=250, help="last-stage steps between evals (curves)")
    parser.add_argument("--eval-limit", type=int, default=400, help="test questions per eval")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (toy runs)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="steps of the ViT teacher's and the baseline encoder's pretraining (default: recipes')")
    parser.add_argument("--equal-flops", action="store_true", help="fit every run's last stage to one FLOPs budget")
    parser.add_argument("--flops-budget", type=float, default=None,
                        help="the budget in FLOPs (implies --equal-flops; default: the largest recipe's total)")
    parser.add_argument("--count", choices=("trainer", "measured"), default="trainer",
                        help="which FLOPs --equal-flops makes equal")
    parser.add_argument("--measure-steps", type=int, default=2,
                        help="steps per stage run through torch's FLOP counter (0: do not measure)")
    parser.add_argument("--write", type=Path, nargs="?", const=Path(__file__).resolve().parent.parent / "BENCHMARKS.md",
                        default=None, help="replace the ablation section of this Markdown file (default BENCHMARKS.md)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots from --out's ablation.json (no training)")
    args = parser.parse_args()
    if args.replot:
        draw_plots(json.loads((args.out / "ablation.json").read_text())["runs"], args.out)
        print(f"redrew the plots in {args.out}")
        return
    equal_flops = args.equal_flops or args.flops_budget is not None
    toy = args.n != 2000 or args.scale != 1.0 or args.pretrain_steps is not None
    data = args.out / "data"
    ensure_data(data, n=args.n, seed=args.seed, progress=False)  # re-made unless it was written with these settings
    runs = variants(args.eval_every, args.scale, args.pretrain_steps, args.seed)
    _, plans, budget = plan_runs(runs, data, equal_flops, args.count, args.flops_budget, args.measure_steps)
    records = [train_and_evaluate(name, plan, data, args.out, args.eval_limit) for name, plan in plans.items()]
    (args.out / "ablation.json").write_text(json.dumps({"budget": budget, "count": args.count, "runs": records},
                                                       indent=1))
    draw_plots(records, args.out)
    text = section(args, records, budget, toy)
    (args.out / "ablation.md").write_text(text)
    print(text)
    if args.write is not None:
        replace_section(args.write, SECTION, text, NOTES_MARKER)
        print(f"wrote the section to {args.write}")


if __name__ == "__main__":
    main()
