"""The `monovlm eval` and `monovlm compare` commands: resolve the model and data, run, print, write the report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from monovlm.eval.protocol import ModelRunner
from monovlm.eval.report import (
    EvalRun,
    compare_table,
    evaluate_model,
    load_runs,
    markdown,
    write_report,
)
from monovlm.eval.tasks import load_task
from monovlm.files import write_atomic
from monovlm.paths import DEFAULT_MODEL_DIR

DEFAULT_SYNTHETIC_DATA = Path("runs/quickstart/data")  # what the quickstart (and the shipped model) used
DEFAULT_KEEPS = (0.5, 0.25, 0.11)


def resolve_model(model: str | os.PathLike) -> Path:
    return DEFAULT_MODEL_DIR if str(model) in ("default", "tiny") else Path(model)


def resolve_data(task_names: Sequence[str], data: str | os.PathLike | None, progress: bool = True) -> Path | None:
    """--data, or for the synthetic tasks the quickstart's data (n=4000, seed 0), synthesised if missing or made
    with other settings."""
    if data is not None:
        return Path(data)
    if not all(load_task(t).reader == "synthetic" for t in task_names):
        return None
    from monovlm.quickstart import ensure_data

    ensure_data(DEFAULT_SYNTHETIC_DATA, progress=progress)  # the quickstart's defaults; re-made if they changed
    return DEFAULT_SYNTHETIC_DATA


def _reduction_settings(reduce: str | None, keep: Sequence[float] | None) -> list[dict]:
    if reduce is None:
        if keep:
            raise ValueError("--keep needs --reduce METHOD")
        return []
    from monovlm.infer.reduction import METHODS

    if reduce not in METHODS:
        raise ValueError(f"--reduce {reduce!r}: unknown token reduction method; choose one of {sorted(METHODS)}")
    for value in keep or ():
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--keep {value}: a kept fraction must be in (0, 1]")
    return [{"reduction": reduce, "keep": value} for value in (keep or DEFAULT_KEEPS)]


def run_eval(model: str | os.PathLike, tasks: Sequence[str], data=None, out=None, limit: int | None = 1000,
             batch_size: int = 32, blind: bool = True, reduce: str | None = None,
             keep: Sequence[float] | None = None, device: str = "cpu", progress: bool = True,
             position_steps: Sequence[float] | None = None, token_pools: Sequence[int] | None = None) -> list[EvalRun]:
    """Evaluate `model` on `tasks` beside its blind baseline, then once more per token-reduction keep ratio, per
    V2PE position step (`position_steps`: visual tokens advance the position by that step instead of the model's)
    and per TokenFLEX pooling (`token_pools`: each image's token grid pooled by that factor)."""
    folder = resolve_model(model)
    settings = _reduction_settings(reduce, keep)  # checked before any work
    for step in position_steps or ():
        if not 0.0 < step <= 1.0:
            raise ValueError(f"--visual-position-step {step}: V2PE's step must be in (0, 1]")
    for pool in token_pools or ():
        if pool < 1:
            raise ValueError(f"--token-pool {pool}: a pooling factor must be >= 1")
    data = resolve_data(tasks, data, progress)
    runner = ModelRunner.load(folder, device=device, batch_size=batch_size)
    runs = [evaluate_model(runner, tasks, data, limit, blind=blind, progress=progress)]
    for setting in settings:
        from monovlm.infer.reduction import build_reduction

        runner.prefill_options = {"reduction": build_reduction(setting["reduction"], keep=setting["keep"])}
        runs.append(evaluate_model(runner, tasks, data, limit, blind=False, progress=progress, setting=setting))
    runner.prefill_options = {}
    model = runner.model
    overrides = [("visual_position_step", model.set_visual_position_step, model.config.decoder.visual_position_step,
                  position_steps), ("token_pool", model.set_token_pool, model.config.vision.token_pool, token_pools)]
    for key, set_value, own, values in overrides:  # each run at one other value, then the model's own again
        for value in values or ():
            set_value(value)
            runs.append(evaluate_model(runner, tasks, data, limit, blind=False, progress=progress,
                                       setting={key: value}))
        set_value(own)
    out = Path(out) if out is not None else Path("runs/eval") / folder.name
    print(markdown(runs), flush=True)  # first: the results are on screen even if the report cannot be written
    written = write_report(runs, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return runs


def run_compare(items: Sequence[str], tasks: Sequence[str] = ("synthetic",), data=None, limit: int | None = 1000,
                out=None) -> str:
    runs: list[EvalRun] = []
    for item in items:
        path = resolve_model(item)
        if (path / "config.json").is_file():  # a model folder: evaluate it now
            runner = ModelRunner.load(path, device="cuda" if torch.cuda.is_available() else "cpu")
            runs.append(evaluate_model(runner, tasks, resolve_data(tasks, data), limit))
        else:
            runs += load_runs(path)
    table = compare_table(runs)
    print(table)
    if out is not None:
        write_atomic(Path(out), lambda p: p.write_text(table + "\n"))
    return table
