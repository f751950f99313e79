"""The quickstart reuses a synthetic data folder only when it was written with the requested settings."""

from monovlm.data.synthetic import synthesize
from monovlm.quickstart import _synthesised_with


def test_data_folder_is_reused_only_with_matching_settings(tmp_path):
    assert _synthesised_with(tmp_path / "nothing") is None
    synthesize(tmp_path / "data", n=12, seed=3, image_size=32, maze_fraction=0.5, progress=False)
    assert _synthesised_with(tmp_path / "data") == {"n": 12, "seed": 3, "maze_fraction": 0.5}
    (tmp_path / "data" / "summary.json").write_text("{not json")
    assert _synthesised_with(tmp_path / "data") is None  # unreadable: synthesise again rather than guess
