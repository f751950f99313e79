"""Evaluate a model on tasks (always with the blind baseline) and write the report: JSON, Markdown, PNG plots.

One `EvalRun` is one model under one setting (e.g. a token-reduction keep ratio) on a list of tasks, with the blind
baseline's results beside the model's. `write_report` takes one run or a sweep of runs of the same model:

  report.json                      every number and every prediction
  report.md                        per task, per category: n, model, blind, gap (and the task's other metrics)
  <task>_per_category.png          accuracy per category, model vs blind
  <task>_vs_tokens_kept.png        with a reduction sweep: accuracy against the visual tokens kept
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.data.datasets import SkipReport
from monovlm.eval.harness import OVERALL, TaskResult, run_task, selected
from monovlm.eval.metrics import MME_COGNITION, MME_PERCEPTION
from monovlm.eval.protocol import ModelRunner
from monovlm.eval.readers import read
from monovlm.eval.samples import EvalSample
from monovlm.eval.tasks import Task, load_task
from monovlm.files import write_atomic

EXTRA_COLUMNS = {"pope": ("f1", "yes_ratio"), "captions": ("bleu4",), "mme": ("acc", "acc_plus")}


@dataclass
class EvalRun:
    model: str
    setting: dict[str, Any]  # e.g. {"reduction": "fastv", "keep": 0.25}; {} for the plain model
    results: list[TaskResult]
    blind: list[TaskResult] = field(default_factory=list)
    read_skips: dict[str, str] = field(default_factory=dict)  # task -> the reader's skip summary

    @property
    def label(self) -> str:
        if not self.setting:
            return self.model
        return self.model + " (" + ", ".join(f"{k}={v}" for k, v in self.setting.items()) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "setting": self.setting, "read_skips": self.read_skips,
                "results": [r.to_dict() for r in self.results], "blind": [r.to_dict() for r in self.blind]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EvalRun":
        return cls(values["model"], values.get("setting", {}), [TaskResult(**r) for r in values["results"]],
                   [TaskResult(**r) for r in values.get("blind", [])], values.get("read_skips", {}))


def read_task_samples(task: Task, data: str | os.PathLike | None,
                      limit: int | None) -> tuple[list[EvalSample], SkipReport, list[str]]:
    """The task's samples (reader skips counted) — read once, shared by the model and the blind runs — and notes on
    what the selection means for the numbers.

    MME's totals add up per-subtask scores, so `limit` applies per subtask there (the first `limit` questions of
    each, images kept whole for acc+): a plain first-`limit` cut would leave the later subtasks out of the total.
    """
    per_subtask = task.metric == "mme" and limit is not None
    result = read(task.reader, **task.resolved_reader_args(data), limit=None if task.where or per_subtask else limit)
    samples = selected(task, result.samples) if task.where else result.samples
    notes: list[str] = []
    if per_subtask:
        samples, cut = limit_per_group(samples, limit)
        if cut:
            notes.append(f"--limit {limit} per subtask cut {len(cut)} subtask(s) ({', '.join(cut)}): scores and "
                         "totals cover part of each of them, not the full benchmark")
    elif task.where and limit:  # filter first, then limit, so --limit counts the task's own samples
        samples = samples[:limit]
    return samples, result.skipped, notes


def limit_per_group(samples: Sequence[EvalSample], limit: int) -> tuple[list[EvalSample], list[str]]:
    """The first samples of each category, whole images at a time (MME's acc+ needs both questions of an image),
    until it holds `limit` (at least one image each); in the original order. Also the categories that were cut."""
    kept_images: dict[str, set[str]] = defaultdict(set)
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter(s.category for s in samples)
    kept = []
    for sample in samples:
        image = str(sample.meta.get("image_key", sample.image))
        images = kept_images[sample.category]
        if image not in images:
            if images and counts[sample.category] >= limit:
                continue
            images.add(image)
        counts[sample.category] += 1
        kept.append(sample)
    cut = [category for category in totals if counts[category] < totals[category]]
    return kept, cut


def _partial_totals_note(result: TaskResult) -> str | None:
    """MME's perception and cognition totals are sums over official subtasks: say so when some are absent."""
    present = {group.lower() for group in result.counts if group != OVERALL}
    official = MME_PERCEPTION + MME_COGNITION
    missing = [name for name in official if name.lower() not in present]
    if not missing or len(missing) == len(official):  # complete, or not MME's subtasks at all (a custom TSV)
        return None
    return (f"partial totals: {len(official) - len(missing)} of MME's {len(official)} subtasks present (missing "
            f"{', '.join(missing)}); the score, perception and cognition sums are not comparable with full MME")


def evaluate_model(runner: ModelRunner, tasks: Sequence[str | Task], data: str | os.PathLike | None = None,
                   limit: int | None = None, blind: bool = True, progress: bool = True,
                   setting: dict[str, Any] | None = None) -> EvalRun:
    """Run every task on the model and, unless `blind=False`, on the blind baseline."""
    run = EvalRun(runner.name, dict(setting or {}), [])
    for item in tasks:
        task = item if isinstance(item, Task) else load_task(item)
        samples, read_skips, notes = read_task_samples(task, data, limit)
        run.read_skips[task.name] = read_skips.summary()
        results = [run_task(runner, task, samples, skipped=SkipReport(), progress=progress)]
        if blind:
            results.append(run_task(runner, task, samples, blank=True, skipped=SkipReport(), progress=progress))
        if task.metric == "mme" and task.group_by == "category":
            notes += [n for n in [_partial_totals_note(results[0])] if n]
        for note in notes:
            warnings.warn(f"task {task.name!r}: {note}", stacklevel=2)
        for result in results:
            result.notes.extend(notes)
        run.results.append(results[0])
        run.blind.extend(results[1:])
    return run


# -------------------------------------------------------------------------------------------------------------------
# Markdown


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}"


def _number(metric: str, value: float | None) -> str:
    if metric in ("score", "cider", "bleu4") and value is not None:  # MME scores and CIDEr are not percentages
        return f"{value:.2f}" if metric != "score" else f"{value:.1f}"
    return _pct(value)


def task_table(result: TaskResult, blind: TaskResult | None) -> str:
    """One Markdown table: a row per group (overall last), model vs blind on the primary metric, then extras."""
    extras = [m for m in EXTRA_COLUMNS.get(result.metric, ()) if m in result.scores.get(OVERALL, {})]
    header = ["group", "n", f"model {result.primary}"]
    if blind is not None:
        header += [f"blind {result.primary}", "gap"]
    header += [f"model {m}" for m in extras] + ([f"blind {m}" for m in extras] if blind is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    groups = [g for g in result.scores if g != OVERALL] + [OVERALL]
    for group in groups:
        value = result.scores[group].get(result.primary)
        row = [f"**{group}**" if group == OVERALL else group, str(result.counts.get(group, 0)),
               _number(result.primary, value)]
        if blind is not None:
            blind_value = blind.scores.get(group, {}).get(result.primary)
            gap = None if value is None or blind_value is None else value - blind_value
            row += [_number(result.primary, blind_value),
                    ("+" if gap is not None and gap >= 0 else "") + _number(result.primary, gap)]
        row += [_number(m, result.scores[group].get(m)) for m in extras]
        if blind is not None:
            row += [_number(m, blind.scores.get(group, {}).get(m)) for m in extras]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(runs: Sequence[EvalRun]) -> str:
    parts = []
    for run in runs:
        parts.append(f"## {run.label}\n")
        blind_by_task = {r.task: r for r in run.blind}
        for result in run.results:
            parts.append(f"### {result.task} ({result.metric}; numbers in % unless noted)\n")
            parts.append(task_table(result, blind_by_task.get(result.task)) + "\n")
            notes = [s for s in (run.read_skips.get(result.task, ""), result.skip_summary) if s and "skipped" in s]
            parts += [f"_{n.splitlines()[0]}_\n" for n in notes]
            parts += [f"**Note:** {note}\n" for note in result.notes]
    return "\n".join(parts)


def compare_table(runs: Sequence[EvalRun]) -> str:
    """Models side by side: a row per task and group, a column per run (primary metric), plus its blind score."""
    header = ["task", "group"] + [f"{r.label}" for r in runs] + [f"{r.label} blind" for r in runs if r.blind]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    rows: dict[tuple[str, str], None] = {}
    for run in runs:
        for result in run.results:
            for group in [g for g in result.scores if g != OVERALL] + [OVERALL]:
                rows[(result.task, group)] = None
    for task_name, group in rows:
        cells = [task_name, f"**{group}**" if group == OVERALL else group]
        blinds = []
        for run in runs:
            result = next((r for r in run.results if r.task == task_name), None)
            blind = next((r for r in run.blind if r.task == task_name), None)
            cells.append(_number(result.primary, result.scores.get(group, {}).get(result.primary)) if result else "—")
            if run.blind:
                blinds.append(_number(blind.primary, blind.scores.get(group, {}).get(blind.primary)) if blind else "—")
        lines.append("| " + " | ".join(cells + blinds) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def plot_per_category(result: TaskResult, blind: TaskResult | None, path: Path) -> Path:
    plt = _pyplot()
    groups = [g for g in result.scores if g != OVERALL] + [OVERALL]
    model_values = [result.scores[g].get(result.primary, float("nan")) for g in groups]
    width = 0.4 if blind is not None else 0.8
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 3.6))
    positions = range(len(groups))
    axis.bar([p - (width / 2 if blind else 0) for p in positions], model_values, width, label="model")
    if blind is not None:
        blind_values = [blind.scores.get(g, {}).get(result.primary, float("nan")) for g in groups]
        axis.bar([p + width / 2 for p in positions], blind_values, width, label="blind (grey image)", color="0.6")
    axis.set_xticks(list(positions), groups, rotation=20)
    axis.set_ylabel(result.primary)
    if result.primary not in ("score", "cider"):
        axis.set_ylim(0, 1)
    axis.set_title(f"{result.task}: {result.primary} per {'group'}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_vs_tokens(runs: Sequence[EvalRun], task: str, path: Path) -> Path:
    """Accuracy against the fraction of visual tokens kept, one line per reduction method."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.6))

    def overall(run: EvalRun) -> float | None:
        result = next((r for r in run.results if r.task == task), None)
        return None if result is None else result.scores[OVERALL].get(result.primary)

    unreduced = [(1.0, overall(run)) for run in runs if not run.setting and overall(run) is not None]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.setting and overall(run) is not None:
            method = str(run.setting.get("reduction", "?"))
            by_method.setdefault(method, list(unreduced)).append((float(run.setting.get("keep", 1.0)), overall(run)))
    for method, points in by_method.items():
        points = sorted(points)
        axis.plot([100 * k for k, _ in points], [v for _, v in points], marker="o", label=method)
    blind = next((r for run in runs for r in run.blind if r.task == task and not run.setting), None)
    if blind is not None:
        axis.axhline(blind.scores[OVERALL][blind.primary], color="0.5", linestyle="--", label="blind")
    axis.set_xlabel("visual tokens kept (%)")
    axis.set_ylabel(f"{task} overall")
    axis.set_xlim(0, 105)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -------------------------------------------------------------------------------------------------------------------
# files


def write_report(runs: EvalRun | Sequence[EvalRun], out: str | os.PathLike) -> list[Path]:
    """report.json first (every number; the plots are redrawn from it), then report.md, then the plots, each written
    atomically."""
    runs = [runs] if isinstance(runs, EvalRun) else list(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = json.dumps([r.to_dict() for r in runs], indent=1) + "\n"
    written = [write_atomic(out / "report.json", lambda p: p.write_text(report)),
               write_atomic(out / "report.md", lambda p: p.write_text("# monovlm eval\n\n" + markdown(runs)))]
    base = next((r for r in runs if not r.setting), runs[0])
    blind_by_task = {r.task: r for r in base.blind}
    for result in base.results:
        written.append(write_atomic(out / f"{result.task}_per_category.png",
                                    lambda p: plot_per_category(result, blind_by_task.get(result.task), p)))
    if any(r.setting.get("keep") is not None for r in runs):
        for result in base.results:
            written.append(write_atomic(out / f"{result.task}_vs_tokens_kept.png",
                                        lambda p: plot_vs_tokens(runs, result.task, p)))
    return written


def load_runs(path: str | os.PathLike) -> list[EvalRun]:
    """The runs of an eval output folder or its report.json."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no report.json (run `monovlm eval` with --out first)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    return [EvalRun.from_dict(v) for v in values]
