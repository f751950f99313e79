"""The quickstart: synthesise data, train the default tiny encoder-free model with a recipe, evaluate it next to the
blind baseline, and answer a few questions about held-out images — one command, offline, on a laptop CPU.

The shipped default model (`monovlm/assets/tiny-eve`) is what `monovlm quickstart --ship` produces with the defaults;
`monovlm chat` uses it when no model is given. Shipping writes into the source tree (the package folder of a source
checkout, never an installed package), stores the weights in bf16 (greedy accuracy holds within noise; half the bytes
in git history), and replaces the shipped model only when the new one answers materially better (`--force-ship`
overrides): each re-ship adds the weights' size to the repository's history for good.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from monovlm.files import write_folder_atomic
from monovlm.paths import DEFAULT_MODEL_DIR, PACKAGE_DIR

# a re-ship must beat the shipped model's overall accuracy by this much: 1000 questions measure accuracy to about
# +-1.5 points, so a smaller gain is likely noise, and every re-ship adds the weights to git history
SHIP_MARGIN = 0.02
SHIP_DTYPE = "bfloat16"  # the shipped weights' dtype (loading casts them to the model's float32)


class ShipError(ValueError):
    """The model cannot be shipped from here; the message says why and what to do instead."""


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


def source_checkout() -> Path | None:
    """The source tree the package was imported from (its pyproject.toml names monovlm), or None for an installed
    package."""
    root = PACKAGE_DIR.parent
    try:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "monovlm"' in pyproject else None


def check_ship_target() -> None:
    """Fail before training when the shipped model is not in a source checkout: shipping into an installed package
    would silently change every user's default model and be lost on the next install."""
    if source_checkout() is None:
        raise ShipError(f"--ship writes the default model into the source tree, but monovlm is imported from an "
                        f"installed package ({PACKAGE_DIR}); run the quickstart from a source checkout "
                        "(git clone, then pip install -e .)")


def ship_refusal(report: dict[str, Any]) -> str | None:
    """Why the new model should not replace the shipped one (None: ship it)."""
    try:
        shipped = json.loads((DEFAULT_MODEL_DIR / "report.json").read_text())
        shipped_accuracy = shipped["model"]["overall"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # nothing comparable is shipped
    settings = {key: report[key] for key in data_settings()}
    shipped_settings = {key: shipped.get(key) for key in data_settings()}
    questions, shipped_questions = sum(report["counts"].values()), sum(shipped.get("counts", {}).values())
    if settings != shipped_settings or questions != shipped_questions:
        return (f"the shipped model was evaluated on other questions ({shipped_questions} from data "
                f"{shipped_settings}, this one on {questions} from {settings}), so the two cannot be compared; "
                "evaluate on the same data or use --force-ship")
    accuracy = report["model"]["overall"]
    if accuracy < shipped_accuracy + SHIP_MARGIN:
        return (f"its overall accuracy {accuracy:.1%} does not beat the shipped model's {shipped_accuracy:.1%} by "
                f"{SHIP_MARGIN:.0%} (about the noise of 1000 questions); use --force-ship to replace it anyway")
    return None


def round_to_ship_dtype(model) -> None:
    """Round the model's weights to the shipped dtype in place (they stay float32), so that its evaluation describes
    the weights that will be shipped."""
    import torch

    dtype = getattr(torch, SHIP_DTYPE)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))


def ship(model, tokenizer, report: dict[str, Any]) -> Path:
    """Write the model (weights in SHIP_DTYPE) and its report as the shipped default model.

    Written to a sibling folder first and renamed into place, so an interrupted ship never leaves a half-written
    default model."""
    import torch

    dtype = getattr(torch, SHIP_DTYPE)
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in model.state_dict().items()}

    def write(folder: Path) -> None:
        model.save(folder, tokenizer, state_dict=state)
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    write_folder_atomic(DEFAULT_MODEL_DIR, write)
    return DEFAULT_MODEL_DIR


def run_quickstart(out: Path, recipe_name: str = "eve-synthetic", n: int = 4000, seed: int = 0,
                   eval_limit: int = 1000, examples: int = 6, ship: bool = False, force_ship: bool = False,
                   progress: bool = True, maze_fraction: float = 0.2) -> dict[str, Any]:
    """Data, training, evaluation beside the blind baseline, example answers; with `ship`, the model (its weights
    rounded to SHIP_DTYPE before it is evaluated) replaces the shipped one when it is materially better, or always
    with `force_ship`."""
    from monovlm.data.processor import Processor
    from monovlm.eval.qa import answer, answer_of, evaluate_qa, question_of
    from monovlm.train.recipe import load_recipe
    from monovlm.train.trainer import TrainOptions, train

    if ship:
        check_ship_target()  # before 15 minutes of training, not after
    started = time.perf_counter()
    out = Path(out)
    data = out / "data"
    ensure_data(data, n=n, seed=seed, maze_fraction=maze_fraction, progress=progress, prefix="[1/4] ")
    recipe = load_recipe(recipe_name)
    recipe.seed = seed
    print(f"[2/4] training with the {recipe.name!r} recipe ({len(recipe.stages)} stages)")
    # the quickstart's folder is its own: a second quickstart into it replaces the first one's run
    result = train(TrainOptions(recipe=recipe, data_root=data, run_dir=out / "run", eval_data=None, overwrite=True,
                                progress=progress))
    model, tokenizer = result.model.eval(), result.tokenizer
    if ship:
        round_to_ship_dtype(model)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    records = json.loads((data / "instruct_test.json").read_text())[:eval_limit]
    print(f"[3/4] evaluating on {len(records)} held-out questions, with the real image and with a blank one")
    scores = evaluate_qa(model, processor, records, data, progress=progress)
    blind = evaluate_qa(model, processor, records, data, blank=True, progress=progress)
    table = report_table(scores.accuracy, blind.accuracy, scores.counts)
    print(table)
    print("[4/4] a few answers about test images")
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
        refusal = None if force_ship else ship_refusal(report)
        if refusal is None:
            print(f"shipped the model ({SHIP_DTYPE} weights) to {ship(model, tokenizer, report)}")
        else:
            print(f"not shipped: {refusal}")
    print(f"done in {minutes:.1f} minutes; report in {out / 'report.md'}; model in {result.final_dir}")
    return report
