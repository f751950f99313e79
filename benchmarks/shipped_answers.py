"""Greedy answers of a model on the synthetic test split, plain and through every inference wrapper (token
reduction at the prefill, compiled decode steps, the DAMRO and VCD decoding strategies), written to one JSON file;
with --compare, the answers are checked against an earlier file of the same variants.

It is the record that a restructuring of the decoder leaves the shipped model's behaviour unchanged: run it before,
run it after with --compare, and every answer must be identical.

    python benchmarks/shipped_answers.py --data runs/quickstart/data --out runs/answers_before.json
    python benchmarks/shipped_answers.py --data runs/quickstart/data --out runs/answers_after.json \
        --compare runs/answers_before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "fastv", "pyramid_drop_renumber", "tome", "damro", "vcd", "compiled")


def runner_for(variant: str, model_dir: Path):
    from monovlm.eval.protocol import ModelRunner
    from monovlm.infer import decoding
    from monovlm.infer.reduction import build_reduction

    options: dict = {}
    if variant == "fastv":
        options["prefill_options"] = {"reduction": build_reduction("fastv", keep=0.5, layer=2)}
    elif variant == "pyramid_drop_renumber":
        options["prefill_options"] = {"reduction": build_reduction("pyramiddrop", keep=0.75, positions="renumber")}
    elif variant == "tome":
        options["prefill_options"] = {"reduction": build_reduction("tome", keep=0.5, layer=1)}
    elif variant == "damro":
        options["strategy"] = decoding.DAMRO(alpha=0.5, k=4)
    elif variant == "vcd":
        options["strategy"] = decoding.VCD(alpha=1.0, beta=0.1)
    return ModelRunner.load(model_dir, batch_size=32, **options)


def answers_of(variant: str, model_dir: Path, records: list[dict], data: Path) -> list[str]:
    from monovlm.eval.protocol import Query
    from monovlm.eval.qa import question_of
    from monovlm.infer.generate import GenerationConfig

    runner = runner_for(variant, model_dir)
    queries = [Query(question_of(r), [runner.load_image(data / r["image"])]) for r in records]
    settings = GenerationConfig(max_new_tokens=8, compile=variant == "compiled")
    return runner.generate(queries, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="quickstart data folder (synthesised if missing)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the answers to")
    parser.add_argument("--limit", type=int, default=1000, help="test questions to answer")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--compare", type=Path, default=None, help="an earlier output: fail on any differing answer")
    args = parser.parse_args(argv)

    from monovlm.quickstart import ensure_data

    ensure_data(args.data)
    model_dir = args.model
    if model_dir is None:
        from monovlm.paths import DEFAULT_MODEL_DIR

        model_dir = DEFAULT_MODEL_DIR
    records = json.loads((args.data / "instruct_test.json").read_text())[: args.limit]
    result = {"model": str(model_dir), "questions": len(records), "answers": {}, "sha256": {}}
    for variant in args.variants:
        started = time.perf_counter()
        answers = answers_of(variant, model_dir, records, args.data)
        result["answers"][variant] = answers
        result["sha256"][variant] = hashlib.sha256(json.dumps(answers).encode()).hexdigest()
        print(f"{variant}: {len(answers)} answers in {time.perf_counter() - started:.1f} s, "
              f"sha256 {result['sha256'][variant][:16]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())["answers"]
    failed = False
    for variant, answers in result["answers"].items():
        if variant not in before:
            print(f"{variant}: not in {args.compare}")
            continue
        differ = [i for i, (a, b) in enumerate(zip(answers, before[variant])) if a != b]
        if len(answers) != len(before[variant]):
            differ.append(-1)
        failed |= bool(differ)
        print(f"{variant}: {'identical' if not differ else f'{len(differ)} answers differ, e.g. #{differ[0]}'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
