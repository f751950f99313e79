"""The quickstart reuses a synthetic data folder only when it was written with the requested settings."""

import json

from monovlm.data.synthetic import synthesize
from monovlm.quickstart import _synthesised_with


def test_data_folder_is_reused_only_with_matching_settings(tmp_path):
    assert _synthesised_with(tmp_path / "nothing") is None
    synthesize(tmp_path / "data", n=12, seed=3, image_size=32, maze_fraction=0.5, progress=False)
    assert _synthesised_with(tmp_path / "data") == {"format": 2, "n": 12, "seed": 3, "maze_fraction": 0.5,
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
