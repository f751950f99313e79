"""Writing files and folders so that a crash, a kill or a full disk never leaves half of one.

Everything is written to a sibling first and renamed into place: a reader sees the previous version whole, or the
new one whole."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(temporary)` into a hidden sibling of `path`, then rename it over `path`: a full disk or a crash leaves
    the previous file whole (never half a report), and the temporary is removed. An OSError names `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix tells savefig the format
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename is None:  # a failed write() names no file; the user needs to know which one
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def write_folder_atomic(folder: Path, write: Callable[[Path], Any]) -> Path:
    """`write(temporary)` into `FOLDER.tmp`, then put it in place of `folder`: the previous folder is moved aside to
    `FOLDER.old` and removed only once the new one is in place. A crash before the swap leaves the previous folder
    untouched (a leftover `.tmp` is cleared by the next write); a crash during it leaves the previous folder in
    `.old`, never a folder mixing new files with old ones."""
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    previous = folder.with_name(folder.name + ".old")
    for stale in (temporary, previous):
        if stale.exists():
            shutil.rmtree(stale)  # leftovers of an interrupted write
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder
