"""Evaluation tasks as data: a TOML file names the reader, the prompt, the answer extraction, the metric and the
generation settings.

The shipped tasks live in `monovlm/eval/tasks/*.toml`; a user's own task is any TOML file with the same keys. Reader
arguments may contain `{data}`, replaced by the `--data` folder given on the command line, so one task file serves
any copy of a benchmark:

```toml
name = "pope"
description = "POPE (JSONL questions over COCO images)"
reader = "pope"
metric = "pope"              # exact_match | vqa | pope | mme | captions | multiple_choice
extract = "yes_no"           # raw | first_line | yes_no | letter
post_prompt = "Answer with yes or no."
max_new_tokens = 8
[reader_args]
path = "{data}/coco_pope_random.json"
image_dir = "{data}/val2014"
```

A task that reads one file of the user's choosing sets `data_file` (its default name) and writes `{data_file}`:
`--data` may then name that file itself (any name; `{data}` becomes the file's folder) or a folder, where the task
reads `data_file`, else the folder's only JSON / JSON-lines file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monovlm.config import ConfigError

TASKS_DIR = Path(__file__).parent / "tasks"
METRICS = ("exact_match", "vqa", "pope", "mme", "captions", "multiple_choice")
EXTRACTORS = ("raw", "first_line", "yes_no", "letter")
OUTPUTS = ("generate", "loglikelihood")  # multiple choice: by generated letter, or by the options' log-likelihood


@dataclass
class Task:
    name: str
    reader: str  # a name in monovlm.eval.readers.READERS
    metric: str
    description: str = ""
    reader_args: dict[str, Any] = field(default_factory=dict)
    output: str = "generate"
    extract: str = "first_line"
    post_prompt: str = ""  # appended to every question, e.g. "Answer with a single word."
    max_new_tokens: int = 16
    where: dict[str, Any] = field(default_factory=dict)  # keep samples whose category / meta fields equal these
    group_by: str = "category"  # "category" or a meta key: the rows of the per-category report
    data_file: str = ""  # the file `{data_file}` names when --data is a folder (see the module docstring)

    def __post_init__(self) -> None:
        checks = {"metric": (self.metric, METRICS), "extract": (self.extract, EXTRACTORS),
                  "output": (self.output, OUTPUTS)}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"task {self.name!r}: {key} = {value!r} is not one of {allowed}")
        if self.output == "loglikelihood" and self.metric != "multiple_choice":
            raise ConfigError(f"task {self.name!r}: output 'loglikelihood' only scores multiple-choice options")
        if self.max_new_tokens < 1:
            raise ConfigError(f"task {self.name!r}: max_new_tokens = {self.max_new_tokens} must be >= 1")

    def prompt(self, question: str) -> str:
        return f"{question}\n{self.post_prompt}" if self.post_prompt else question

    def resolved_reader_args(self, data: str | Path | None) -> dict[str, Any]:
        """Reader arguments with `{data}` (and `{data_file}`) replaced; an error if a task needs `--data` and none
        was given."""
        resolved = {}
        paths: tuple[Path, Path] | None = None
        for key, value in self.reader_args.items():
            if isinstance(value, str) and ("{data}" in value or "{data_file}" in value):
                if data is None:
                    raise ConfigError(f"task {self.name!r} reads files under a data folder: pass --data")
                if not self.data_file:
                    value = value.replace("{data}", str(data))
                else:
                    paths = paths or self.data_paths(data)
                    value = value.replace("{data_file}", str(paths[1])).replace("{data}", str(paths[0]))
            resolved[key] = value
        return resolved

    def data_paths(self, data: str | Path) -> tuple[Path, Path]:
        """(data folder, data file) for a task with a `data_file`: --data names the file, or the folder holding it."""
        data = Path(data)
        if data.is_file():
            return data.parent, data
        if not data.is_dir():
            raise ConfigError(f"task {self.name!r}: --data {data} does not exist")
        if (data / self.data_file).is_file():
            return data, data / self.data_file
        candidates = sorted(p for p in data.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if len(candidates) == 1:
            return data, candidates[0]
        found = f"it holds {', '.join(p.name for p in candidates)}" if candidates else "it holds no .json/.jsonl file"
        raise ConfigError(f"task {self.name!r} reads {data / self.data_file}, which does not exist ({found}); "
                          "pass the file itself as --data")


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.toml"))


def load_task(name_or_path: str | Path) -> Task:
    """A shipped task by name, or a task TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = TASKS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"task {str(name_or_path)!r} not found (looked at {path}); shipped tasks: {shipped_tasks()}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    known = set(Task.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown task keys {unknown}; known keys: {sorted(known)}")
    for key in ("name", "reader", "metric"):
        if key not in values:
            raise ConfigError(f"{path}: the task needs a {key!r}")
    return Task(**values)
