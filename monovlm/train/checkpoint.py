"""Checkpoints: an inference-ready model folder plus the training state, written atomically.

`runs/NAME/checkpoints/step_000200/` holds config.json, model.safetensors and the tokenizer (loadable for inference
as is) and `train_state.pt` (optimizer, schedule position, data position, RNG states, the align head). A checkpoint
is written into `step_000200.tmp/` and renamed into place only when complete (`files.write_folder_atomic`), so an
interrupted write never damages the previous checkpoint and `latest_checkpoint` never returns a half-written one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from monovlm.files import write_folder_atomic

TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{global_step:06d}"


def save_checkpoint(folder: Path, model, tokenizer, train_state: dict[str, Any], keep: int = 2,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    def write(temporary: Path) -> None:
        model.save(temporary, tokenizer, state_dict=state_dict)
        torch.save(train_state, temporary / TRAIN_STATE)

    write_folder_atomic(folder, write)
    _prune(Path(folder).parent, keep)
    return Path(folder)


def _step(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))


def _prune(checkpoints: Path, keep: int) -> None:
    steps = sorted((p for p in checkpoints.iterdir() if _STEP_DIR.match(p.name)), key=_step)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those holding a training state), newest first."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    complete = [p for p in checkpoints.iterdir() if _STEP_DIR.match(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(complete, key=_step, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    newest = checkpoints_newest_first(run_dir)
    return newest[0] if newest else None


def load_train_state(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / TRAIN_STATE, weights_only=True, map_location="cpu")


def rng_state() -> dict[str, Any]:
    """The global RNG streams (torch CPU, CUDA when present, Python). Every rank seeds and draws alike in this
    trainer, so rank 0's state stands for all of them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
