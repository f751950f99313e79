"""Where monovlm's own files live inside the installed package."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "assets" / "tiny-eve"  # the shipped tiny model: `monovlm chat` without a model
