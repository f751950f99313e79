"""The quickstart reuses a synthetic data folder only when it was written with the requested settings, and ships its
model only into a source checkout, in bf16, when it is materially better than the shipped one."""

import json

import pytest

from monovlm.data.synthetic import DATA_FORMAT, synthesize
from monovlm.quickstart import _synthesised_with


def test_data_folder_is_reused_only_with_matching_settings(tmp_path):
    assert _synthesised_with(tmp_path / "nothing") is None
    synthesize(tmp_path / "data", n=12, seed=3, image_size=32, maze_fraction=0.5, progress=False)
    assert _synthesised_with(tmp_path / "data") == {"format": DATA_FORMAT, "n": 12, "seed": 3, "maze_fraction": 0.5,
                                                       "maze_cells": [3, 4], "train_negatives": "pope"}
    synthesize(tmp_path / "data", n=12, seed=3, image_size=32, maze_fraction=0.5, progress=False, maze_cells=(4, 5))
    assert _synthesised_with(tmp_path / "data")["maze_cells"] == [4, 5]  # another maze size: not the default data
    synthesize(tmp_path / "data", n=12, seed=3, image_size=32, maze_fraction=0.5, progress=False,
               train_negatives="balanced")
    assert _synthesised_with(tmp_path / "data")["train_negatives"] == "balanced"  # other train questions: not reused
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    del summary["train_negatives"]  # written before the setting existed: synthesised again (same bytes), not guessed
    (tmp_path / "data" / "summary.json").write_text(json.dumps(summary))
    assert _synthesised_with(tmp_path / "data")["train_negatives"] is None
    del summary["format"]  # written before the existence drills: no drill files, so synthesised again
    (tmp_path / "data" / "summary.json").write_text(json.dumps(summary))
    assert _synthesised_with(tmp_path / "data")["format"] is None
    (tmp_path / "data" / "summary.json").write_text("{not json")
    assert _synthesised_with(tmp_path / "data") is None  # unreadable: synthesise again rather than guess


def test_ensure_data_remakes_a_folder_written_with_other_maze_sizes(tmp_path, capsys):
    from monovlm.data.synthetic import MAZE_CELLS
    from monovlm.quickstart import ensure_data

    data = tmp_path / "data"
    synthesize(data, n=12, seed=3, image_size=64, maze_fraction=0.5, progress=False, maze_cells=(5, 6))
    ensure_data(data, n=12, seed=3, maze_fraction=0.5, progress=False)
    assert "synthesising" in capsys.readouterr().out
    assert _synthesised_with(data)["maze_cells"] == list(MAZE_CELLS)
    assert _synthesised_with(data)["train_negatives"] == "balanced"  # the quickstart's train questions
    ensure_data(data, n=12, seed=3, maze_fraction=0.5, progress=False)
    assert "reusing" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# shipping the default model


def test_ship_needs_a_source_checkout(tmp_path, monkeypatch):
    from monovlm import quickstart

    assert quickstart.source_checkout() is not None  # the tests run from the source tree
    installed = tmp_path / "site-packages" / "monovlm"
    installed.mkdir(parents=True)
    monkeypatch.setattr(quickstart, "PACKAGE_DIR", installed)
    assert quickstart.source_checkout() is None
    with pytest.raises(quickstart.ShipError, match="source checkout"):  # refused before any data or training
        quickstart.run_quickstart(tmp_path / "out", ship=True, progress=False)
    assert not (tmp_path / "out").exists()


def shipped_report(overall: float, n: int = 4000, questions: int = 1000) -> dict:
    from monovlm.quickstart import data_settings

    return {**data_settings(n=n), "model": {"overall": overall}, "counts": {"a": questions // 2, "b": questions // 2}}


def test_a_model_is_reshipped_only_when_materially_better(tmp_path, monkeypatch):
    from monovlm import quickstart

    monkeypatch.setattr(quickstart, "DEFAULT_MODEL_DIR", tmp_path / "tiny-eve")
    assert quickstart.ship_refusal(shipped_report(0.5)) is None  # nothing shipped yet
    (tmp_path / "tiny-eve").mkdir()
    (tmp_path / "tiny-eve" / "report.json").write_text(json.dumps(shipped_report(0.574)))
    refusal = quickstart.ship_refusal(shipped_report(0.584))
    assert "58.4%" in refusal and "57.4%" in refusal and "--force-ship" in refusal
    assert quickstart.ship_refusal(shipped_report(0.574 + quickstart.SHIP_MARGIN + 0.001)) is None
    assert "cannot be compared" in quickstart.ship_refusal(shipped_report(0.9, n=2000))
    assert "cannot be compared" in quickstart.ship_refusal(shipped_report(0.9, questions=200))


def test_ship_writes_bf16_weights_that_load_as_float32(tmp_path, monkeypatch):
    import torch
    from safetensors import safe_open

    from monovlm import quickstart
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.paths import DEFAULT_MODEL_DIR
    from monovlm.tokenizer import Tokenizer

    model = EncoderFreeVLM.load(DEFAULT_MODEL_DIR)
    target = tmp_path / "tiny-eve"
    target.mkdir()
    (target / "stale.txt").write_text("from the previous ship")
    monkeypatch.setattr(quickstart, "DEFAULT_MODEL_DIR", target)
    quickstart.ship(model, Tokenizer.from_folder(DEFAULT_MODEL_DIR), shipped_report(0.6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-eve"]  # renamed into place, nothing left over
    assert not (target / "stale.txt").exists() and json.loads((target / "report.json").read_text())["model"]
    loaded = EncoderFreeVLM.load(target)
    quickstart.round_to_ship_dtype(model)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, model.state_dict()[name]), name
    with safe_open(str(target / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_the_quickstarts_recipe_reads_what_the_synthetic_generator_writes(tmp_path):
    """The quickstart trains `eve-synthetic`; every file it reads is in the data the quickstart synthesises. The
    synthetic data is also in LLaVA's two-file layout (captions.json, instruct.json), so the generic recipes read it
    as they read a user's."""
    import inspect

    from monovlm.quickstart import run_quickstart
    from monovlm.train.recipe import load_recipe, resolve_data

    name = inspect.signature(run_quickstart).parameters["recipe_name"].default
    assert name == "eve-synthetic"
    synthesize(tmp_path / "data", n=12, seed=0, image_size=32, progress=False)
    resolve_data(load_recipe(name), tmp_path / "data")  # raises, naming the file, if one is missing
    resolve_data(load_recipe("llava-synthetic"), tmp_path / "data")
    for generic in ("eve", "evev2", "mono-internvl", "neo", "solo", "llava"):
        resolve_data(load_recipe(generic), tmp_path / "data")
    (tmp_path / "data" / "captions.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing captions.json"):
        resolve_data(load_recipe("eve"), tmp_path / "data")
