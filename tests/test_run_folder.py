"""Run folders under faults: a reused --out, a crash while saving, a damaged checkpoint, metrics after a resume, and
stages whose data is all or mostly unusable. The data is a user's layout (plain PNGs + LLaVA JSON)."""

import json

import pytest
import torch

from monovlm.config import ConfigError
from monovlm.data.datasets import DatasetError
from monovlm.files import write_folder_atomic
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.train.recipe import recipe_from_dict
from monovlm.train.trainer import TrainOptions, train

from image_folder import write_llava_folder


def recipe(steps=(3, 4), save_every=2, data=("captions.json", "qa.json"), **data_settings):
    stage = dict(batch_size=4, warmup_steps=1, max_length=200, lr=3e-3, save_every=save_every)
    return recipe_from_dict({
        "name": "tiny", "seed": 0, "data": data_settings,
        "model": {"vocab_size": 300,
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [
            {"name": "caption", "data": data[0], "template": "plain", "train": ["embedder"], "steps": steps[0],
             **stage},
            {"name": "qa", "data": data[1], "template": "chatml", "train": ["embedder", "decoder"], "steps": steps[1],
             **stage},
        ],
    })


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_llava_folder(tmp_path_factory.mktemp("user_data"), n=16)


def options(recipe, data_root, run_dir, **overrides):
    values = dict(recipe=recipe, data_root=data_root, run_dir=run_dir, progress=False, measure_peak=False,
                  eval_data=None, dtype="float32")
    values.update(overrides)
    return TrainOptions(**values)


def metric_steps(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["global_step"] for r in records if "loss" in r]


# -------------------------------------------------------------------------------------------------------------------
# 1. one run per folder


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_unless_overwrite(data_root, tmp_path):
    run = tmp_path / "run"
    train(options(recipe(), data_root, run))
    other = recipe(steps=(2, 2), save_every=1)
    with pytest.raises(ConfigError, match="already holds a training run.*--overwrite"):
        train(options(other, data_root, run))
    assert (run / "checkpoints" / "step_000007").is_dir()  # the first run is untouched

    replaced = train(options(other, data_root, run, overwrite=True))
    assert len(replaced.losses) == 4
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_000003", "step_000004"]  # only this run's checkpoints, the newest two
    assert metric_steps(run) == [1, 2, 3, 4]
    assert json.loads((run / "recipe.json").read_text())["stages"][0]["steps"] == 2


def test_resume_refuses_another_recipe_and_changed_data(data_root, tmp_path):
    run = tmp_path / "run"
    train(options(recipe(), data_root, run, stop_after=2))
    with pytest.raises(ConfigError, match=r"stages\.caption\.lr"):
        changed = recipe()
        changed.stages[0].lr = 1e-2
        train(options(changed, data_root, run, resume=True))
    data = tmp_path / "data"
    write_llava_folder(data, n=16)
    train(options(recipe(), data, tmp_path / "run2", stop_after=2))
    records = json.loads((data / "qa.json").read_text())
    (data / "qa.json").write_text(json.dumps(records[:-1]))
    with pytest.raises(ConfigError, match=r"qa\.json changed"):
        train(options(recipe(), data, tmp_path / "run2", resume=True))


# -------------------------------------------------------------------------------------------------------------------
# 2. model folders written whole or not at all


def test_write_folder_atomic_leaves_the_previous_folder_whole_when_the_write_fails(tmp_path):
    folder = tmp_path / "final"
    write_folder_atomic(folder, lambda f: (f.mkdir(), (f / "config.json").write_text("old"),
                                           (f / "model.safetensors").write_text("old weights")))

    def crash(f):
        f.mkdir()
        (f / "config.json").write_text("new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomic(folder, crash)
    assert (folder / "config.json").read_text() == "old"
    assert (folder / "model.safetensors").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary left behind


def test_a_crash_while_saving_the_final_model_keeps_the_previous_one(data_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = train(options(recipe(), data_root, run))
    before = EncoderFreeVLM.load(run / "final").state_dict()
    longer = recipe()
    longer.stages.append(longer.stages[1])  # a stage added at the end: resume trains it, then saves final/ again
    save = EncoderFreeVLM.save

    def save_then_crash(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)
        if "checkpoints" not in str(folder):  # the final model: config and weights written, then the disk fails
            raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(EncoderFreeVLM, "save", save_then_crash)
    with pytest.raises(OSError):
        train(options(longer, data_root, run, resume=True))
    after = EncoderFreeVLM.load(run / "final").state_dict()
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(after[name], before[name]), name
    assert not (run / "final.tmp").exists()


# -------------------------------------------------------------------------------------------------------------------
# 3. and 4. resume from a damaged run


def test_resume_passes_over_a_corrupt_latest_checkpoint_and_the_metrics_are_logged_once(data_root, tmp_path, capsys):
    full = train(options(recipe(), data_root, tmp_path / "full"))
    run = tmp_path / "run"
    train(options(recipe(), data_root, run, stop_after=6))  # checkpoints kept: global steps 3 (stage end) and 5
    weights = run / "checkpoints" / "step_000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated write
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    resumed = train(options(recipe(), data_root, run, resume=True))
    out = capsys.readouterr().out
    assert "step_000005" in out and "passed over" in out and "resuming from" in out
    assert resumed.losses == full.losses[3:]  # exactly the uninterrupted run from the older checkpoint on
    assert metric_steps(run) == list(range(1, 8))  # steps 4 to 6 ran twice, logged once


def test_resume_with_every_checkpoint_damaged_is_one_error_naming_them(data_root, tmp_path):
    run = tmp_path / "run"
    train(options(recipe(), data_root, run, stop_after=5))
    for folder in (run / "checkpoints").iterdir():
        (folder / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="none of its 2 checkpoint.*step_000005.*step_000003"):
        train(options(recipe(), data_root, run, resume=True))


# -------------------------------------------------------------------------------------------------------------------
# 5. stages without (enough) usable data


def test_a_stage_with_no_usable_sample_stops_with_the_reasons(data_root, tmp_path):
    bad = tmp_path / "data"
    write_llava_folder(bad, n=16)
    for image in (bad / "photos").iterdir():  # the images are elsewhere: every record names a missing file
        image.unlink()
    with pytest.raises(DatasetError, match=r"(?s)stage 'caption'.*none of the 12 samples.*image unreadable"):
        train(options(recipe(), bad, tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists()


def write_partly_broken(root, broken: int):
    write_llava_folder(root, n=16)
    for index in range(broken):
        (root / "photos" / f"img_{index:02d}.png").write_bytes(b"not a png")
    return root


def test_a_stage_over_the_skipped_share_stops_and_warn_trains_on(tmp_path, capsys):
    data = write_partly_broken(tmp_path / "data", broken=4)  # 25% of the samples
    with pytest.raises(DatasetError, match=r"(?s)stage 'caption'.*% of the 12 samples read so far are unusable.*max_skipped = 5%"):
        train(options(recipe(), data, tmp_path / "strict"))
    capsys.readouterr()
    warned = train(options(recipe(over_max_skipped="warn"), data, tmp_path / "warned"))
    assert len(warned.losses) == 7
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "max_skipped" in out
    allowed = train(options(recipe(max_skipped=0.3), data, tmp_path / "allowed"))
    assert len(allowed.losses) == 7


def test_no_usable_sample_stops_even_when_skips_only_warn(data_root, tmp_path):
    qa_only_broken = tmp_path / "data"
    write_llava_folder(qa_only_broken, n=16)
    records = json.loads((qa_only_broken / "qa.json").read_text())
    for record in records:
        record["image"] = "elsewhere/" + record["image"]
    (qa_only_broken / "qa.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=r"(?s)stage 'qa'.*none of the 16 samples"):
        train(options(recipe(over_max_skipped="warn", max_skipped=1.0), qa_only_broken, tmp_path / "run"))


def test_how_the_data_is_read_is_no_difference_on_resume():
    """num_workers and prefetch change how batches are read, not which: a run resumes under other values."""
    from monovlm.train.recipe import load_recipe, recipe_differences, recipe_to_dict

    recipe = load_recipe("eve")
    recorded = recipe_to_dict(recipe)
    recorded["data"].pop("num_workers")  # a run recorded before these keys existed
    recipe.data.num_workers, recipe.data.prefetch = 2, 4
    assert recipe_differences(recorded, recipe_to_dict(recipe)) == []
    recipe.data.max_skipped = 0.5
    assert recipe_differences(recorded, recipe_to_dict(recipe)) == ["data.max_skipped: 0.05 in the run, 0.5 now"]
