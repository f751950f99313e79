"""One line for an error the user can fix: which file, and what is wrong with it.

The CLI shows `describe_error(error)` instead of a traceback when it returns a line (exit status 2), and lets the
traceback through when it returns None: a traceback is for a bug in monovlm, not for a full disk.

    our own errors (ValueError and its kin: ConfigError, CheckpointError, DatasetError, ImageLoadError, ...,
        and any class monovlm defines) already name the thing and the reason -> their message
    the environment: OSError (permission, full disk, read-only, missing folder, ...)   -> file + reason + hint
    damaged files read by libraries: safetensors, torch.load, JSON, UTF-8 -> file + "truncated or corrupt"/...
    anything else                                                          -> None (a bug: keep the traceback)

Libraries often do not say which file they were reading or writing (a full disk during `write()`, a truncated
safetensors header). The file is then taken from the traceback: the innermost monovlm frame that holds a path in
a variable with a path's name (`path`, `file`, `weights`, ...), since that is the file monovlm was working on.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

# OS error numbers -> the reason in words and what to do about it
_OS_REASONS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EFBIG: "file too large for the file system (or the process's file size limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.ENOTEMPTY: "the folder is not empty",
    errno.EXDEV: "cannot move across file systems",
    errno.EADDRINUSE: "the address is already in use (another server on that port?); choose another --port",
    errno.EADDRNOTAVAIL: "the address is not available on this machine; check --host",
}
# errors about addresses, not files: no file to look for
_NOT_FILES = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.ECONNREFUSED, errno.ENETUNREACH}

# local variable names that hold the file a frame is working on, most specific first
_PATH_NAMES = ("path", "file", "filename", "file_name", "weights", "target", "temporary", "destination", "index_path",
               "config_path", "folder", "out")

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def run_command(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call a command's function: 0 when it returns, 2 with one line on stderr for an error the user can fix
    (`monovlm NAME: error: <file>: <reason>`); any other error is raised, traceback and all."""
    try:
        function(*args, **kwargs)
    except Exception as error:
        message = describe_error(error)
        if message is None:
            raise  # a bug in monovlm: its traceback is what the bug report needs
        print(f"monovlm {name}: error: {message}", file=sys.stderr)
        return 2
    return 0


def describe_error(error: BaseException) -> str | None:
    """One line naming the file and the reason for an error the user can fix, or None for a bug (keep its
    traceback). Never raises."""
    try:
        return _describe(error)
    except Exception:  # describing must never hide the original error behind a new one
        return None


def _describe(error: BaseException) -> str | None:
    if isinstance(error, OSError) and error.errno is not None:
        return _describe_os_error(error)
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):  # no errno: a library's message
        return _with_file(error, str(error) or type(error).__name__)
    if isinstance(error, json.JSONDecodeError):
        return _with_file(error, f"is not valid JSON ({error})")
    if isinstance(error, UnicodeDecodeError):
        return _with_file(error, f"is not UTF-8 text ({error.reason} at byte {error.start})")
    if isinstance(error, (ValueError, FileNotFoundError)):  # ours: the message names the thing and the reason
        return str(error) or None
    if type(error).__module__.startswith("monovlm.") and str(error):  # a class of ours, e.g. a KeyError kind
        return str(error)
    if _is_safetensors_error(error):
        return _with_file(error, f"is not a readable safetensors file: truncated or corrupt ({error})")
    if isinstance(error, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile)) or (
            isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)):
        reason = str(error).split(". ")[0] or type(error).__name__  # torch's message goes on for a paragraph
        return _with_file(error, f"is truncated or corrupt ({reason})")
    if isinstance(error, MemoryError):
        return "out of memory (MemoryError); try a smaller batch size or a smaller model"
    return None


def _describe_os_error(error: OSError) -> str:
    reason = _OS_REASONS.get(error.errno, error.strerror or os.strerror(error.errno))
    if error.filename is not None and error.filename2 is not None:  # rename, link, copy
        return f"{error.filename} -> {error.filename2}: {reason}"
    if error.filename is not None:
        return f"{error.filename}: {reason}"
    return reason if error.errno in _NOT_FILES else _with_file(error, reason)


def _with_file(error: BaseException, reason: str) -> str:
    where = _file_in_traceback(error.__traceback__)
    return f"{where}: {reason}" if where is not None else f"{reason} (the file was not named by the library)"


def _file_in_traceback(traceback: TracebackType | None) -> str | None:
    """The path the innermost monovlm frame was working on, from its local variables (see the module docstring)."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        if not os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            continue
        for name in _PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, os.PathLike) or (isinstance(value, str) and os.sep in value):
                return os.fspath(value)
    return None


def _is_safetensors_error(error: BaseException) -> bool:
    try:
        from safetensors import SafetensorError
    except ImportError:  # an old safetensors without the public name: match by class name
        return type(error).__name__ == "SafetensorError"
    return isinstance(error, SafetensorError)


__all__ = ["describe_error", "run_command"]
