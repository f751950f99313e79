"""A run folder's identity and its log: one run per `--out`, resumed only as itself.

RUN/recipe.json holds the recipe as run (overrides applied) and RUN/data.json a fingerprint of every data file the
stages read (bytes and SHA-256). A fresh run into a folder that already holds a run is refused (or, with
`overwrite`, replaces it), so two runs never share checkpoints; `--resume` refuses a folder whose recipe or data
differ from the ones given, naming each difference. On resume, metrics.jsonl is cut back to the checkpoint's step so
the steps run again are not logged twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from monovlm.config import ConfigError
from monovlm.data.shards import INDEX as SHARD_INDEX
from monovlm.files import write_text_atomic
from monovlm.train.recipe import Recipe, recipe_differences, recipe_to_dict

RECIPE_FILE = "recipe.json"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.jsonl"
# what a run writes into its folder; --overwrite removes these (the "vit" teacher in RUN/teacher is a cache checked
# against its settings and data, so it stays)
RUN_OUTPUTS = (RECIPE_FILE, DATA_FILE, METRICS_FILE, "checkpoints", "final")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(recipe: Recipe, data_root: Path) -> dict[str, dict[str, Any]]:
    """{data file (relative to the data root): {"bytes", "sha256"}} for every file the recipe's stages read; for a
    shard folder, those of its shards.json (which records every tar's size)."""
    files = sorted({file for stage in recipe.stages for file, _, _ in stage.data_files})
    fingerprint = {}
    for file in files:
        path = Path(data_root) / file
        if path.is_dir():
            path = path / SHARD_INDEX
        fingerprint[file] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)} if path.is_file() else None
    return fingerprint


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per data file that was added, removed or changed between two fingerprints. A file only one of them
    names is not a difference here: stages added at the end of a recipe read new files (the recipe check names them)."""
    changed = []
    for file in sorted(set(recorded) & set(current)):
        if recorded[file] != current[file]:
            was, now = recorded[file] or {}, current[file] or {}
            changed.append(f"{file} changed ({was.get('bytes', 'missing')} -> {now.get('bytes', 'missing')} bytes)")
    return changed


def holds_a_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_OUTPUTS)


def clear_run(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """A fresh run goes into a folder without a run, or replaces one (`clear_run`) only when asked to."""
    if overwrite or not holds_a_run(run_dir):
        return
    present = ", ".join(name for name in RUN_OUTPUTS if (Path(run_dir) / name).exists())
    raise ConfigError(f"{run_dir} already holds a training run ({present}): continue it with --resume, replace it "
                      "with --overwrite, or train into another --out")


def check_resume(run_dir: Path, recipe: Recipe, fingerprint: dict[str, Any]) -> None:
    """Refuse to continue a run under another recipe or on other data, naming every difference."""
    differences = []
    recorded_recipe = Path(run_dir) / RECIPE_FILE
    if recorded_recipe.is_file():
        differences += recipe_differences(json.loads(recorded_recipe.read_text()), recipe_to_dict(recipe))
    recorded_data = Path(run_dir) / DATA_FILE
    if recorded_data.is_file():
        differences += fingerprint_differences(json.loads(recorded_data.read_text()), fingerprint)
    if differences:  # a checkpoint continued under other settings would be a run nobody wrote down
        raise ConfigError(f"cannot resume {run_dir}: it was started with another recipe or data "
                          f"({recorded_recipe.name}, {recorded_data.name}): " + "; ".join(differences)
                          + ". Resume with the same recipe, --set overrides and data (stages may be added at the end), "
                          "or train into a new --out")


def record_identity(run_dir: Path, recipe: Recipe, fingerprint: dict[str, Any]) -> None:
    """Write what this run is. On resume too: stages added at the end, and the files they read, are part of it."""
    write_text_atomic(Path(run_dir) / RECIPE_FILE, json.dumps(recipe_to_dict(recipe), indent=2))
    write_text_atomic(Path(run_dir) / DATA_FILE, json.dumps(fingerprint, indent=2))


def truncate_metrics(path: Path, global_step: int) -> int:
    """Drop the records logged after `global_step` (the steps a resume runs again). -> records dropped. A torn
    last line (a kill mid-write) is dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("global_step", 0) > global_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
