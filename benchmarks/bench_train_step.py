"""Training-step throughput and MFU of a recipe's stages on random inputs of their shapes (no data is read).

For each stage asked for, runs `--steps` optimizer steps through the dry run's measured path (the trainer's loss,
align loss and AdamW on random token ids and images, bf16 autocast) and reports the median step time after the
first `--warmup` steps, tokens/s, TFLOP/s and MFU against the best bf16 matmul burst measured on the same device in
the same run (and against `--spec-tflops`, the chip's datasheet figure, where given), with the measured peak memory
beside the dry run's estimate.

    python benchmarks/bench_train_step.py benchmarks/recipes/eve_0p5b.toml --spec-tflops 989     # on a GPU
    python benchmarks/bench_train_step.py benchmarks/recipes/eve_0p5b.toml --stage instruct --checkpointing on
    python benchmarks/bench_train_step.py monovlm/recipes/eve-vqa.toml --device cpu --steps 4   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from monovlm.train.dry_run import dry_run
from monovlm.train.flops import measure_peak_flops
from monovlm.train.recipe import load_recipe


def measure(recipe, stage: str, steps: int, warmup: int, checkpointing: bool, device: str, dtype: str) -> dict:
    """One stage's measured steps -> a table row (seconds, rates, memory)."""
    report = dry_run(recipe, steps=steps, dtype=dtype, checkpointing=checkpointing, stage=stage, device=device)
    plan = next(s for s in report.stages if s.name == report.measured.stage)
    timed = report.measured.step_seconds[warmup:]  # main() keeps steps > warmup
    seconds = statistics.median(timed)
    return {"stage": plan.name, "checkpointing": checkpointing, "tokens": plan.tokens, "tflops_step": plan.flops / 1e12,
            "seconds": seconds, "tokens_per_s": plan.tokens / seconds, "tflops_per_s": plan.flops / seconds / 1e12,
            "peak_gib": report.measured.peak_bytes / 2**30, "estimate_gib": (report.measured_estimate or 0) / 2**30,
            "steps_timed": len(timed)}


def table(rows: list[dict], peak_tflops: float, spec_tflops: float | None) -> str:
    head = ("| stage | checkpointing | tokens / step | TFLOPs / step | step (median) | tokens/s | TFLOP/s | "
            "MFU vs measured peak |" + (" MFU vs spec |" if spec_tflops else "") + " peak memory (measured / est.) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spec = f" {100 * r['tflops_per_s'] / spec_tflops:.1f}% |" if spec_tflops else ""
        lines.append(f"| {r['stage']} | {'on' if r['checkpointing'] else 'off'} | {r['tokens']:,} | "
                     f"{r['tflops_step']:.2f} | {1000 * r['seconds']:.0f} ms | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops_per_s']:.3g} | {100 * r['tflops_per_s'] / peak_tflops:.1f}% |{spec} "
                     f"{r['peak_gib']:.1f} / {r['estimate_gib']:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name or TOML path")
    parser.add_argument("--stage", nargs="+", default=None, help="stages to measure (default: every stage)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="activation checkpointing settings to measure each stage with")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--spec-tflops", type=float, default=None,
                        help="the chip's datasheet dense bf16 TFLOP/s, for a second MFU column (H100/H200: 989)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")

    recipe = load_recipe(args.recipe, args.set)
    stages = args.stage or [s.name for s in recipe.stages]
    chip = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    peak = measure_peak_flops(torch.bfloat16, args.device) / 1e12
    print(f"recipe {recipe.name}, device {args.device} ({chip}), torch {torch.__version__}, {args.dtype} autocast; "
          f"best bf16 matmul burst {peak:.3g} TFLOP/s", flush=True)
    rows = []
    for stage in stages:
        for checkpointing in args.checkpointing:
            rows.append(measure(recipe, stage, args.steps, args.warmup, checkpointing == "on", args.device,
                                args.dtype))
            print(f"  {stage} checkpointing {checkpointing}: {1000 * rows[-1]['seconds']:.0f} ms a step", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print()
    print(table(rows, peak, args.spec_tflops))
    print(f"\nMFU = TFLOPs per step (the dry run's count: 6 N per token plus attention, the teacher's forward in align "
          f"stages) / median step time / the peak; median over steps {args.warmup + 1}..{args.steps}.")


if __name__ == "__main__":
    sys.exit(main())
