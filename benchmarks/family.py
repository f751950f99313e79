"""The encoder-free family side by side: every shipped design trained at equal training FLOPs on the same data and
seed, each scored per answer type beside its own blind baseline, with its visual tokens per image and its time to
first token.

    python benchmarks/family.py --out runs/family --seeds 0 1 --write      # ~1.5 h on 2 CPU cores

The data is the second world (benchmarks/second_world.py, written with captions.json): a user's LLaVA folder that
`monovlm data synth` did not make. Every row is a shipped generic recipe as a user runs it (`monovlm train NAME
--data DIR`), or one with `--set` overrides (eve+V2PE, eve+PRIOR, eve+TokenFLEX), scaled by `--scale` (every stage's
steps and the teacher's / encoder's pretraining steps) and then fitted to one FLOPs budget by benchmarks/flops_budget.py
(the last stage lengthened or shortened; the trainer's count). Each run is evaluated with the `llava` task on
instruct_test.json (exact match per category: yes/no, shape, colour), beside the same model with blank images.

TTFT: the median wall time, over `--ttft-repeats` runs after two warm-ups, of the prefill of one question with one
64×64 image and the first token (one thread, batch 1, float32), measured after all training in one pass.

Each run's record is kept in OUT/NAME/seedS/record.json, so rows and seeds can be added by later invocations
(`--rows`, `--seeds`); `--fresh` retrains. `--write [BENCHMARKS.md]` replaces this script's section of that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from ablation_align import categories, fill, plan_runs, plot_curves, stage_flops  # the script's own folder
from second_world import generate  # benchmarks/second_world.py
from sections import replace_section

from monovlm.data.images import num_image_tokens
from monovlm.data.processor import Processor
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import Tokenizer
from monovlm.train.recipe import Recipe, load_recipe
from monovlm.train.trainer import TrainOptions, train

SECTION = "## The family side by side, at equal training FLOPs"
NOTES_MARKER = "<!-- notes below this line are kept when family.py --write rewrites the section -->"

# row name -> (shipped recipe, --set overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "eve": ("eve", []),
    "evev2": ("evev2", []),
    "solo": ("solo", []),
    "neo": ("neo", []),
    "breen": ("breen", []),
    "hovle": ("hovle", []),
    "mono-internvl": ("mono-internvl", []),
    "llava": ("llava", []),
    "eve+V2PE": ("eve", ["model.decoder.visual_position_step=0.25", "stages.*.position_steps=[1.0, 0.5, 0.25]"]),
    "eve+PRIOR": ("eve", ['stages.instruct.loss_weighting="prior"']),
    "eve+TokenFLEX": ("eve", ["stages.*.token_pools=[1, 2]"]),
}


def row_recipe(name: str, scale: float, seed: int) -> Recipe:
    recipe_name, overrides = ROWS[name]
    recipe = load_recipe(recipe_name, overrides)
    recipe.seed = seed
    for stage in recipe.stages:
        stage.steps = max(1, round(stage.steps * scale))
        stage.warmup_steps = min(stage.warmup_steps, stage.steps)
        stage.blind_check = 0.0  # the curve's evals below are enough
    recipe.model.encoder_steps = max(1, round(recipe.model.encoder_steps * scale))
    if recipe.align is not None:
        recipe.align.teacher_steps = max(1, round(recipe.align.teacher_steps * scale))
    return recipe


def train_row(name: str, seed: int, plan, data: Path, out: Path, eval_limit: int) -> dict:
    from monovlm.eval.protocol import ModelRunner
    from monovlm.eval.report import evaluate_model

    run_dir = out / name / f"seed{seed}"
    started = time.perf_counter()
    result = train(TrainOptions(recipe=plan.recipe, data_root=data, run_dir=run_dir, eval_limit=200,
                                progress=False, overwrite=True))
    minutes = (time.perf_counter() - started) / 60
    flops, curve = stage_flops(run_dir)
    model = result.model.eval()
    processor = Processor(result.tokenizer, model.config.vision, model.config.processor)
    final = evaluate_model(ModelRunner(model, processor, name=name), ["llava"], data / "instruct_test.json",
                           limit=eval_limit, progress=False)
    record = {
        "name": name, "seed": seed, "recipe": ROWS[name][0], "overrides": ROWS[name][1], "minutes": round(minutes, 2),
        "steps": {stage.name: stage.steps for stage in plan.recipe.stages},
        "tflops": sum(flops) / 1e12, "tflops_planned": plan.total / 1e12,
        "visual_tokens": num_image_tokens(64, 64, model.config.vision),
        "accuracy": final.results[0].headline(), "blind": final.blind[0].headline(),
        "counts": final.results[0].counts, "curve": curve,
    }
    print(f"{name} seed {seed}: {record['tflops']:.3g} TFLOPs in {minutes:.1f} min; overall "
          f"{100 * record['accuracy'].get('overall', float('nan')):.1f}% "
          f"(blind {100 * record['blind'].get('overall', float('nan')):.1f}%)", flush=True)
    (run_dir / "record.json").write_text(json.dumps(record, indent=1))
    return record


def time_to_first_token(folder: Path, image: Path, repeats: int) -> float:
    """Median seconds of one prefill (question + one image) and its first token, batch 1, one thread."""
    from monovlm.data.images import load_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = EncoderFreeVLM.load(folder).eval()
        processor = Processor(Tokenizer.from_folder(folder), model.config.vision, model.config.processor)
        ids, images = processor.prompt("What shape is the red object?", [load_image(image)])
        ids = torch.tensor([ids])
        times = []
        with torch.no_grad():
            for index in range(repeats + 2):
                cache = model.new_cache(1, ids.shape[1] + 1)
                started = time.perf_counter()
                model(ids, images, cache=cache, last_only=True).argmax(-1)
                if index >= 2:
                    times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------------------------------
# report


def _pct(value) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}"


def table(rows: dict[str, list[dict]], ttft: dict[str, float]) -> str:
    """One line per row: the seeds' mean accuracy per answer type with the mean blind accuracy in brackets, the
    overall accuracy of each seed, visual tokens, TTFT (and its ratio to eve's), TFLOPs."""
    records = [r for runs in rows.values() for r in runs]
    columns = categories(records)
    seeds = sorted({r["seed"] for r in records})
    header = ["row", "visual tokens / image", "TTFT ms (× eve)", "TFLOPs", *[f"{c}" for c in columns],
              "overall per seed (" + ", ".join(str(s) for s in seeds) + ")"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    base = ttft.get("eve")
    for name, runs in rows.items():
        def mean(key, column):
            values = [r[key].get(column) for r in runs if r[key].get(column) is not None]
            return sum(values) / len(values) if values else None
        cells = [f"{_pct(mean('accuracy', c))} ({_pct(mean('blind', c))})" for c in columns]
        per_seed = " / ".join(_pct(r["accuracy"].get("overall")) for r in sorted(runs, key=lambda r: r["seed"]))
        speed = f"{1000 * ttft[name]:.1f}" + (f" ({ttft[name] / base:.2f}×)" if base else "") if name in ttft else "—"
        tflops = sum(r["tflops"] for r in runs) / len(runs)
        lines.append(f"| {name} | {runs[0]['visual_tokens']} | {speed} | {tflops:.2f} | " + " | ".join(cells)
                     + f" | {per_seed} |")
    counts = records[0]["counts"] if records else {}
    lines.append("| questions | | | | " + " | ".join(str(counts.get(c, "")) for c in columns) + " | |")
    return "\n".join(lines)


def section(args: argparse.Namespace, rows: dict[str, list[dict]], ttft: dict[str, float], budget) -> str:
    command = shlex.join(["python", "benchmarks/family.py", *sys.argv[1:]])
    overrides = "; ".join(f"{name}: `{recipe}` " + " ".join(f"`--set {o}`" for o in sets)
                          for name, (recipe, sets) in ROWS.items() if sets and name in rows)
    setting = (f"Command: `{command}`. Date: {date.today().isoformat()}; {platform.machine()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}. Data: the second world "
               f"(`benchmarks/second_world.py --captions`, {args.images} training images of 64×64 px, "
               f"{args.test_images} test images). Every shipped recipe at `--scale {args.scale}` of its steps (and of "
               f"its teacher's or encoder's pretraining), then its last stage fitted so that its training FLOPs (the "
               f"trainer's count) come nearest to {budget / 1e12:.2f} TFLOPs, the largest scaled shipped recipe's total."
               + (f" Rows with overrides: {overrides}." if overrides else ""))
    scores = (f"Exact-match accuracy (%) on the first {args.eval_limit} questions of instruct_test.json (`llava` task), "
              "mean over the seeds, each beside the same models' blind accuracy (blank images) in brackets; the last "
              "column gives each seed's overall accuracy. TTFT: one question with one 64×64 image, batch 1, one "
              f"thread, median of {args.ttft_repeats}. Curves against FLOPs: `{args.out / 'family_curves.png'}` "
              "(not committed).")
    lines = [SECTION, "", fill(setting), "", fill(scores), "", table(rows, ttft), "", NOTES_MARKER, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/family"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--scale", type=float, default=0.25, help="multiply every stage's steps before fitting")
    parser.add_argument("--flops-budget", type=float, default=None,
                        help="in FLOPs; default: the largest total among the scaled shipped recipes")
    parser.add_argument("--eval-limit", type=int, default=1500)
    parser.add_argument("--eval-share", type=float, default=0.34, help="last-stage evals every this share (curves)")
    parser.add_argument("--ttft-repeats", type=int, default=20)
    parser.add_argument("--fresh", action="store_true", help="retrain runs that have a record")
    parser.add_argument("--write", type=Path, nargs="?", const=Path(__file__).resolve().parent.parent / "BENCHMARKS.md",
                        default=None)
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "captions.json").is_file():
        generate(data, args.images, args.test_images, seed=0, captions=True, progress=False)
    budget = args.flops_budget
    for seed in args.seeds:
        if budget is None:  # the largest total among the shipped recipes as they are (the rows without overrides)
            shipped = {name: row_recipe(name, args.scale, seed) for name, (_, sets) in ROWS.items() if not sets}
            _, _, budget = plan_runs(shipped, data, True, "trainer", None, 0)
        runs = {name: row_recipe(name, args.scale, seed) for name in args.rows}
        _, plans, _ = plan_runs(runs, data, True, "trainer", budget, 0)
        for name in args.rows:
            plan = plans[name]
            plan.recipe.stages[-1].eval_every = max(1, round(args.eval_share * plan.recipe.stages[-1].steps))
            if (args.out / name / f"seed{seed}" / "record.json").is_file() and not args.fresh:
                continue
            train_row(name, seed, plan, data, args.out, args.eval_limit)
    rows = {}
    for name in ROWS:
        found = sorted((args.out / name).glob("seed*/record.json"))
        if found:
            rows[name] = [json.loads(path.read_text()) for path in found]
    image = sorted((data / "images").glob("test_*.png"))[0]
    ttft = {name: time_to_first_token(args.out / name / f"seed{runs[0]['seed']}" / "final", image, args.ttft_repeats)
            for name, runs in rows.items()}
    records = [r for runs in rows.values() for r in runs]
    plot_curves([{**r, "name": f"{r['name']} s{r['seed']}"} for r in records], args.out / "family_curves.png")
    text = section(args, rows, ttft, budget)
    (args.out / "family.md").write_text(text)
    print(text)
    if args.write is not None:
        replace_section(args.write, SECTION, text, NOTES_MARKER)
        print(f"wrote the section to {args.write}")


if __name__ == "__main__":
    main()
