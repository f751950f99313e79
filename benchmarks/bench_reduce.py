"""Visual token reduction, LLMC+-style: method × keep budget × synthetic suites, in one run, per model.

For each model (the shipped tiny one: 64 patch tokens per image; and a higher-resolution one: 256) it evaluates the
unreduced model and every method at each keep ratio on the synthetic suite (exact match over all skills) and the
POPE-style suite (F1), and measures, in the same process, prefill time, decode time per token and the KV cache over
a batch of test prompts, with the theoretical FLOPs of the prefill from the tokens each layer actually processed.

    python benchmarks/bench_reduce.py                                  # both models, all methods, 50/25/11 %
    python benchmarks/bench_reduce.py --write BENCHMARKS.md            # ... and replace the section there
    python benchmarks/bench_reduce.py --models default --methods fastv divprune --limit 100   # a quick look

The higher-resolution model is trained by `benchmarks/recipes/eve_hires.toml` (see its header); pass its folder with
--hires (default runs/hires/run/final) and its data with --hires-data (default runs/hires/data).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from sections import replace_section  # benchmarks/sections.py (the script's own folder)

from monovlm.eval.harness import OVERALL
from monovlm.eval.protocol import ModelRunner, Query
from monovlm.eval.report import evaluate_model
from monovlm.eval.run import resolve_data
from monovlm.infer.generate import left_pad
from monovlm.infer.reduction import METHODS, build_reduction, generation_flops, measure_generation
from monovlm.paths import DEFAULT_MODEL_DIR

SECTION = "## Visual token reduction (synthetic suites)"
TASKS = ("synthetic", "synthetic_pope")


def suite_scores(run) -> dict[str, float]:
    by_task = {r.task: r for r in run.results}
    return {"synthetic": by_task["synthetic"].scores[OVERALL]["accuracy"],
            "pope_f1": by_task["synthetic_pope"].scores[OVERALL]["f1"]}


def timing_batch(runner: ModelRunner, data: Path, size: int):
    """A left-padded batch of `size` test prompts with their images (the same batch for every setting)."""
    from monovlm.eval.readers import read_synthetic

    samples = read_synthetic(data, "test", limit=size).samples
    queries = [Query(s.question, [runner.load_image(s.image)]) for s in samples]
    prompts, tensors = runner._encode(queries)
    input_ids, attention_mask = left_pad(prompts, runner.pad_id)
    return input_ids, attention_mask, tensors, [len(p) for p in prompts]


def measure(runner, batch, reduction, new_tokens: int, repeats: int):
    input_ids, attention_mask, images, prompt_tokens = batch
    result = measure_generation(runner.model, input_ids, attention_mask, images, reduction=reduction,
                                new_tokens=new_tokens, repeats=repeats)
    trace = reduction.last_trace if reduction is not None else None
    flops = generation_flops(runner.model, prompt_tokens, new_tokens - 1, trace)
    return result, flops


def visual_tokens(runner: ModelRunner) -> int:
    """Patch tokens per test image of this model (its images are all the same size)."""
    from monovlm.data.images import grid_size

    vision = runner.model.config.vision
    side = int(vision.max_pixels ** 0.5)
    rows, cols = grid_size(side, side, vision)
    return rows * cols


def bench_model(label: str, folder: Path, data: Path, methods, keeps, limit: int, timing_size: int,
                new_tokens: int, repeats: int) -> list[dict]:
    runner = ModelRunner.load(folder, batch_size=32)
    torch.manual_seed(0)
    batch = timing_batch(runner, data, timing_size)
    patches = visual_tokens(runner)
    rows = []
    print(f"[{label}] {patches} patch tokens per image; unreduced ...", flush=True)
    base_scores = suite_scores(evaluate_model(runner, TASKS, data, limit, blind=False, progress=False))
    base_time, base_flops = measure(runner, batch, None, new_tokens, repeats)
    rows.append({"model": label, "patches": patches, "method": "none", "keep": 1.0, "kept": patches, **base_scores,
                 "prefill_ms": base_time.prefill_ms, "decode_ms": base_time.decode_ms_per_token,
                 "kv_bytes": base_time.kv_cache_bytes, "prefill_flops": base_flops.prefill})
    for method in methods:
        for keep in keeps:
            started = time.perf_counter()
            runner.prefill_options = {"reduction": build_reduction(method, keep=keep)}
            scores = suite_scores(evaluate_model(runner, TASKS, data, limit, blind=False, progress=False))
            timing, flops = measure(runner, batch, build_reduction(method, keep=keep), new_tokens, repeats)
            runner.prefill_options = {}
            rows.append({"model": label, "patches": patches, "method": method, "keep": keep,
                         "kept": max(1, round(patches * keep)), **scores, "prefill_ms": timing.prefill_ms,
                         "decode_ms": timing.decode_ms_per_token, "kv_bytes": timing.kv_cache_bytes,
                         "prefill_flops": flops.prefill})
            print(f"[{label}] {method:12s} keep {keep:.2f}: synthetic {100 * scores['synthetic']:.1f}% "
                  f"(base {100 * base_scores['synthetic']:.1f}%), prefill {timing.prefill_ms:.1f} ms "
                  f"(base {base_time.prefill_ms:.1f}) [{time.perf_counter() - started:.0f} s]", flush=True)
    for row in rows:
        row["synthetic_rel"] = row["synthetic"] / base_scores["synthetic"] if base_scores["synthetic"] else float("nan")
        row["pope_rel"] = row["pope_f1"] / base_scores["pope_f1"] if base_scores["pope_f1"] else float("nan")
        row["prefill_speedup"] = base_time.prefill_ms / row["prefill_ms"]
        row["flops_ratio"] = row["prefill_flops"] / base_flops.prefill
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | keep | patches kept | synthetic acc | rel. | POPE F1 | rel. | prefill FLOPs | "
             "prefill ms | prefill speedup | decode ms/token | KV cache |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {100 * r['keep']:.0f}% | {r['kept']}/{r['patches']} | "
            f"{100 * r['synthetic']:.1f}% | {100 * r['synthetic_rel']:.0f}% | {100 * r['pope_f1']:.1f} | "
            f"{100 * r['pope_rel']:.0f}% | {100 * r['flops_ratio']:.0f}% | {r['prefill_ms']:.1f} | "
            f"{r['prefill_speedup']:.2f}× | {r['decode_ms']:.2f} | {r['kv_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


def verdict(rows: list[dict], model: str, keep: float = 0.25) -> str:
    """Does the best method at `keep` keep ≥ 95% of full accuracy with a ≥ 2× measured prefill speedup?"""
    candidates = [r for r in rows if r["model"] == model and r["method"] != "none" and abs(r["keep"] - keep) < 1e-9]
    if not candidates:
        return f"no {model} rows at keep {keep}"
    passing = [r for r in candidates if r["synthetic_rel"] >= 0.95 and r["prefill_speedup"] >= 2.0]
    best = max(candidates, key=lambda r: (r["synthetic_rel"], r["prefill_speedup"]))
    if passing:
        top = max(passing, key=lambda r: r["synthetic_rel"])
        return (f"**yes** — on {model} at {100 * keep:.0f}% of the patch tokens, {top['method']} keeps "
                f"{100 * top['synthetic_rel']:.0f}% of the unreduced synthetic accuracy with a "
                f"{top['prefill_speedup']:.2f}× measured prefill speedup")
    return (f"**no** — on {model} at {100 * keep:.0f}% no method reaches both ≥ 95% accuracy kept and ≥ 2× prefill "
            f"speedup; the most accurate, {best['method']}, keeps {100 * best['synthetic_rel']:.0f}% at "
            f"{best['prefill_speedup']:.2f}×")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        base = next(r for r in rows if r["model"] == model and r["method"] == "none")
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
            points = sorted([(1.0, base["synthetic"])] + [(r["keep"], r["synthetic"]) for r in rows
                                                          if r["model"] == model and r["method"] == method])
            axis.plot([100 * k for k, _ in points], [100 * v for _, v in points], marker="o", label=method)
        axis.set_title(f"{model} ({base['patches']} patch tokens per image)")
        axis.set_xlabel("patch tokens kept (%)")
        axis.set_ylabel("synthetic accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "hires"], choices=["default", "hires"])
    parser.add_argument("--hires", type=Path, default=Path("runs/hires/run/final"))
    parser.add_argument("--hires-data", type=Path, default=Path("runs/hires/data"))
    parser.add_argument("--data", type=Path, default=None, help="the default model's data (default: quickstart's)")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.11])
    parser.add_argument("--limit", type=int, default=400, help="questions per suite")
    parser.add_argument("--timing-batch", type=int, default=8, help="prompts in the timed batch")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=Path("runs/bench_reduce/accuracy_vs_tokens.png"))
    parser.add_argument("--write", type=Path, default=None, help="replace the section in this Markdown file")
    args = parser.parse_args(argv)

    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    rows = []
    for model in args.models:
        if model == "default":
            rows += bench_model("tiny-eve (64 px)", DEFAULT_MODEL_DIR, resolve_data(["synthetic"], args.data),
                                args.methods, args.keeps, args.limit, args.timing_batch, args.new_tokens, args.repeats)
        else:
            if not (args.hires / "config.json").is_file():
                print(f"no higher-resolution model at {args.hires}; train it first (see eve_hires.toml)", file=sys.stderr)
                return 2
            rows += bench_model("eve-hires (128 px)", args.hires, args.hires_data, args.methods, args.keeps,
                                args.limit, args.timing_batch, args.new_tokens, args.repeats)
    minutes = (time.perf_counter() - started) / 60
    plot(rows, args.plot)
    Path(args.plot.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    verdicts = [verdict(rows, m) for m in dict.fromkeys(r["model"] for r in rows)]
    command = "python benchmarks/bench_reduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = (f"Command: `{command.strip()}` ({minutes:.0f} min; {date.today()}; {platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}). Accuracy: `synthetic` (exact match, all "
            f"skills) and `synthetic_pope` (F1) on the first {args.limit} test questions each; `rel.` = relative to "
            f"the unreduced model. Timings: median of {args.repeats} greedy runs over one batch of "
            f"{args.timing_batch} test prompts ({args.new_tokens} new tokens), all settings in one process; prefill "
            f"FLOPs counted from the tokens each layer processed (`monovlm/infer/reduction/accounting.py`).\n\n"
            + table(rows) + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    print(body)
    print(f"plot: {args.plot}")
    if args.write:
        replace_section(args.write, SECTION, f"{SECTION}\n\n{body.strip()}\n")
        print(f"wrote the section to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
