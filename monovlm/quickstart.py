"""The quickstart: synthesise data, train the default tiny encoder-free model with a recipe, evaluate it next to the
blind baseline, and answer a few questions about held-out images — one command, offline, on a laptop CPU.

The shipped default model (`monovlm/assets/tiny-eve`) is exactly what `monovlm quickstart --ship` produces with the
defaults; `monovlm chat` uses it when no model is given.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-eve"


def report_table(model_scores: dict[str, float], blind_scores: dict[str, float], counts: dict[str, int]) -> str:
    lines = ["| category | questions | model | blind (blank image) | gap |", "|---|---:|---:|---:|---:|"]
    for category in [c for c in model_scores if c != "overall"] + ["overall"]:
        model, blind = model_scores[category], blind_scores.get(category, float("nan"))
        count = counts.get(category, sum(counts.values()) if category == "overall" else 0)
        lines.append(f"| {category} | {count} | {100 * model:.1f}% | {100 * blind:.1f}% | {100 * (model - blind):+.1f} |")
    return "\n".join(lines)


def _synthesised_with(data: Path) -> dict[str, Any] | None:
    """The settings the data folder was synthesised with (None if there is none): reused only when they match."""
    try:
        summary = json.loads((data / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return {key: summary.get(key) for key in data_settings()}  # what a reused folder must match


def data_settings(n: int = 4000, seed: int = 0, maze_fraction: float = 0.2) -> dict[str, Any]:
    """The settings, as the data's summary.json records them, of the quickstart's data (default maze sizes)."""
    from monovlm.data.synthetic import BALANCED, DATA_FORMAT, MAZE_CELLS

    # balanced train existence negatives: with POPE's samplers the question's wording gives the answer away and the
    # model learns the name prior instead of looking (see synthetic.TRAIN_NEGATIVES)
    return {"format": DATA_FORMAT, "n": n, "seed": seed, "maze_fraction": maze_fraction,
            "maze_cells": list(MAZE_CELLS), "train_negatives": BALANCED}


def ensure_data(data: Path, n: int = 4000, seed: int = 0, maze_fraction: float = 0.2, progress: bool = True,
                prefix: str = "") -> None:
    """Synthesise the data into `data` unless the folder already holds exactly these settings; say which."""
    from monovlm.data.synthetic import synthesize

    settings = data_settings(n, seed, maze_fraction)
    if _synthesised_with(Path(data)) == settings:
        print(f"{prefix}reusing synthetic data in {data}")
        return
    print(f"{prefix}synthesising {n} images ({maze_fraction:.0%} mazes, seed {seed}) into {data}")
    synthesize(data, n=n, seed=seed, maze_fraction=maze_fraction, progress=progress,
               train_negatives=settings["train_negatives"])


def run_quickstart(out: Path, recipe_name: str = "eve", n: int = 4000, seed: int = 0, eval_limit: int = 1000,
                   examples: int = 6, ship: bool = False, progress: bool = True,
                   maze_fraction: float = 0.2) -> dict[str, Any]:
    from monovlm.data.processor import Processor
    from monovlm.eval.qa import answer, evaluate_qa, question_of, answer_of
    from monovlm.train.recipe import load_recipe
    from monovlm.train.trainer import TrainOptions, train

    started = time.perf_counter()
    out = Path(out)
    data = out / "data"
    ensure_data(data, n=n, seed=seed, maze_fraction=maze_fraction, progress=progress, prefix="[1/4] ")
    recipe = load_recipe(recipe_name)
    recipe.seed = seed
    print(f"[2/4] training with the {recipe.name!r} recipe ({len(recipe.stages)} stages)")
    result = train(TrainOptions(recipe=recipe, data_root=data, run_dir=out / "run", eval_data=None,
                                progress=progress))
    model, tokenizer = result.model.eval(), result.tokenizer
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    records = json.loads((data / "instruct_test.json").read_text())[:eval_limit]
    print(f"[3/4] evaluating on {len(records)} held-out questions, with the real image and with a blank one")
    scores = evaluate_qa(model, processor, records, data, progress=progress)
    blind = evaluate_qa(model, processor, records, data, blank=True, progress=progress)
    table = report_table(scores.accuracy, blind.accuracy, scores.counts)
    print(table)
    print(f"[4/4] a few answers about test images")
    shown = records[:: max(1, len(records) // examples)][:examples]
    images = [processor.load(data / r["image"]) for r in shown]
    answers = answer(model, processor, [question_of(r) for r in shown], images)
    lines = []
    for record, output in zip(shown, answers):
        line = f"  {record['image']}: {question_of(record)!r} -> {output!r} (truth: {answer_of(record)!r})"
        lines.append(line)
        print(line)
    minutes = (time.perf_counter() - started) / 60
    report = {"recipe": recipe.name, **data_settings(n, seed, maze_fraction), "minutes": minutes,
              "model": scores.accuracy, "blind": blind.accuracy, "counts": scores.counts, "examples": lines}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(f"# quickstart ({recipe.name}, seed {seed}, {minutes:.1f} min)\n\n{table}\n\n"
                                   + "\n".join(lines) + "\n")
    if ship:
        if DEFAULT_MODEL_DIR.exists():
            shutil.rmtree(DEFAULT_MODEL_DIR)
        shutil.copytree(result.final_dir, DEFAULT_MODEL_DIR)
        (DEFAULT_MODEL_DIR / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"shipped the model to {DEFAULT_MODEL_DIR}")
    print(f"done in {minutes:.1f} minutes; report in {out / 'report.md'}; model in {result.final_dir}")
    return report
