"""Environment errors (full disk, unwritable folder, damaged files) are one line naming the file and the reason,
exit status 2; bugs keep their traceback."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monovlm import cli
from monovlm.commands import chat, data_synth
from monovlm.errors import describe_error, run_command
from monovlm.model.teachers import MissingTeacherFeatures
from monovlm.paths import DEFAULT_MODEL_DIR


def raised(function, *args) -> BaseException:
    try:
        function(*args)
    except BaseException as error:  # noqa: BLE001 - the test inspects whatever came out
        return error
    raise AssertionError("nothing was raised")


# -------------------------------------------------------------------------------------------------------------------
# describe_error


def test_os_errors_name_the_file_and_the_reason():
    assert describe_error(PermissionError(errno.EACCES, "Permission denied", "/runs/x")) == "/runs/x: permission denied"
    assert describe_error(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")) == (
        "/mnt/ro/out: the file system is read-only; write elsewhere")
    assert describe_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors")) == (
        "/runs/x/model.safetensors: no space left on the device; free some space or write elsewhere")
    assert describe_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/final")) == (
        "/a/tmp -> /b/final: cannot move across file systems")
    assert describe_error(OSError(errno.EBADMSG, "Bad message", "/x")) == "/x: Bad message"  # unlisted: strerror
    assert describe_error(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "the address is already in use (another server on that port?); choose another --port")
    # a full disk during write() names no file: the line still says what happened
    assert describe_error(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the device")


def test_damaged_files_read_by_libraries_are_described(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64)}, weights)
    weights.write_bytes(weights.read_bytes()[:-16])
    # raised outside monovlm's own frames, so no file can be named; monovlm's loaders name it (tests below)
    assert describe_error(raised(safe_open, str(weights), "pt")) == (
        "is not a readable safetensors file: truncated or corrupt (Error while deserializing header: incomplete "
        "metadata, file not fully covered) (the file was not named by the library)")
    truncated = tmp_path / "state.pt"
    torch.save({"step": 3, "weights": torch.zeros(256)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert "is truncated or corrupt (PytorchStreamReader failed reading zip archive" in describe_error(
        raised(torch.load, truncated))
    assert describe_error(raised(json.loads, "{")).startswith("is not valid JSON (Expecting property name")
    assert describe_error(raised(b"ab\xff".decode, "utf-8")).startswith("is not UTF-8 text (invalid start byte at "
                                                                          "byte 2)")


def test_our_own_errors_pass_through_and_bugs_keep_their_traceback():
    assert describe_error(ValueError("recipe 'x' not found")) == "recipe 'x' not found"
    assert describe_error(FileNotFoundError("runs/a: no report.json")) == "runs/a: no report.json"
    missing = MissingTeacherFeatures("no teacher features for key 'a.png' in features.safetensors")
    assert describe_error(missing) == "no teacher features for key 'a.png' in features.safetensors"  # a KeyError
    for bug in (KeyError("k"), TypeError("bad call"), AttributeError("x"), RuntimeError("CUDA error"),
                AssertionError(), ZeroDivisionError()):
        assert describe_error(bug) is None, bug


# -------------------------------------------------------------------------------------------------------------------
# run_command: what `monovlm <verb>` does with an error


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert run_command("data synth", data_synth, out=blocker / "data", n=4, progress=False) == 2
    err = capsys.readouterr().err
    assert err == f"monovlm data synth: error: {blocker / 'data' / 'images'}: a part of the path is not a folder\n"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    # a file size limit fails every write past 4 kB as a full disk would (EFBIG for ENOSPC), in a child process only
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
from pathlib import Path
from monovlm.commands import data_synth
from monovlm.errors import run_command
raise SystemExit(run_command("data synth", data_synth, out=Path({str(tmp_path / "data")!r}), n=8, progress=False))
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2, child.stderr
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in child.stderr
    assert lines[0].startswith(f"monovlm data synth: error: {tmp_path / 'data'}")
    assert lines[0].endswith(": file too large for the file system (or the process's file size limit)")


@pytest.fixture
def model_copy(tmp_path) -> Path:
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model"))


def test_a_truncated_or_malformed_model_is_one_line(model_copy, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_command("chat", chat, "hi", model=model_copy) == 2
    assert capsys.readouterr().err.startswith(
        f"monovlm chat: error: {weights} is not a readable safetensors file (truncated or corrupt?)")
    (model_copy / "config.json").write_text("[1, 2]")
    assert run_command("chat", chat, "hi", model=model_copy) == 2
    assert capsys.readouterr().err == (
        f"monovlm chat: error: {model_copy / 'config.json'} must hold a JSON object, found a JSON array\n")


def test_a_bug_keeps_its_traceback():
    def buggy():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_command("train", buggy)
    assert run_command("train", lambda: None) == 0


def test_every_cli_command_turns_environment_errors_into_one_line(tmp_path, model_copy, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["data", "synth", "--out", str(blocker / "data"), "--n", "4", "--no-progress"]) == 2
    assert "a part of the path is not a folder" in capsys.readouterr().err
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli.main(["eval", str(model_copy), "--data", str(tmp_path), "--limit", "2", "--out", str(tmp_path / "eval"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"monovlm eval: error: {weights} is not a readable safetensors file") and "\n" == err[-1]
