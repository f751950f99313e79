"""Reading a user's LLaVA folder for the teacher: the images its data files name (keys as written, paths under the
image root, escapes and malformed entries skipped and counted), and precomputing an HF teacher's features from it
into the file a `features:` teacher reads."""

import json

import pytest
import torch
from image_folder import write_llava_folder

from monovlm.config import VisionConfig
from monovlm.data.datasets import DatasetError, SkipReport
from monovlm.data.image_files import DataImage, data_images, iter_pixels, load_pixels, stage_sources
from monovlm.model.teachers import HFVisionTeacher, PrecomputedTeacher
from monovlm.train.recipe import recipe_from_dict

VISION = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)


@pytest.fixture
def folder(tmp_path):
    return write_llava_folder(tmp_path / "data", n=6, size=(32, 32))


def test_data_images_lists_each_image_once_under_its_key(folder):
    (folder / "more").mkdir()
    (folder / "more" / "extra.json").write_text(json.dumps([{"image": "img_00.png"}]))  # image root: photos/
    (folder / "mixed.json").write_text(json.dumps([
        {"image": ["photos/img_01.png", "photos/img_02.png"]},  # already listed: not twice
        {"conversations": [{"from": "human", "value": "text only"}]},  # no image: nothing to list, nothing skipped
        {"image": "../../outside.png"},
        {"image": "photos/img\u0000.png"},
        {"image": 7}]))
    report = SkipReport()
    images = data_images(folder, ["captions.json", "qa.json", ("more/extra.json", "photos"), "mixed.json"], report)
    assert [image.key for image in images] == [f"photos/img_{i:02d}.png" for i in range(6)] + ["img_00.png"]
    assert all(image.path.is_file() for image in images)
    assert images[-1].path == images[0].path  # the same file under two keys, as the two data files name it
    assert report.reasons == {"image path escapes the root": 1, "image path invalid": 1, "malformed image entry": 1}
    with pytest.raises(DatasetError, match="nothere.json does not exist"):
        data_images(folder, ["nothere.json"])
    # one key naming two files (the same entry under two image roots): a features file could not tell them apart
    with pytest.raises(DatasetError, match="'photos/img_00.png' names two files"):
        data_images(folder, ["captions.json", ("captions.json", "photos")])


def test_unreadable_images_are_skipped_and_counted(folder):
    (folder / "photos" / "img_03.png").write_bytes(b"broken")
    images = data_images(folder, ["captions.json"])
    report = SkipReport()
    loaded = list(iter_pixels(images, VISION, report))
    assert [image.key for image, _ in loaded] == [f"photos/img_{i:02d}.png" for i in (0, 1, 2, 4, 5)]
    assert report.reasons == {"image unreadable": 1} and "img_03.png" in report.examples[0].detail
    assert loaded[0][1].shape == (3, 32, 32)


def test_stage_sources_are_every_stages_files_once():
    recipe = recipe_from_dict({"name": "r", "stages": [
        {"name": "a", "data": "captions.json", "template": "plain"},
        {"name": "b", "data": ["qa.json", "captions.json"], "image_root": "imgs"},
        {"name": "c", "data": "qa.json", "image_root": "imgs"}]})
    assert stage_sources(recipe.stages) == [("captions.json", None), ("qa.json", "imgs"), ("captions.json", "imgs")]


def test_precomputed_features_equal_the_teachers_on_what_training_feeds_it(folder, tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from monovlm.train.teacher_features import precompute_teacher_features

    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(clip)
    (folder / "photos" / "img_05.png").write_bytes(b"broken")
    path, report = precompute_teacher_features(f"hf:{clip}", folder, ["captions.json", "qa.json"],
                                               tmp_path / "out" / "feats.safetensors", vision=VISION, batch_size=4,
                                               progress=False)
    assert report.reasons == {"image unreadable": 1}
    stored = PrecomputedTeacher(path)
    assert len(stored) == 5 and stored.feature_dim == 32 and "photos/img_05.png" not in stored
    teacher = HFVisionTeacher.from_folder(clip, vision=VISION)
    key = "photos/img_02.png"
    expected = teacher([load_pixels(DataImage(key, folder / key), VISION)])[0]
    got = stored([torch.zeros(3, 32, 32)], [key])[0]
    assert got.dtype == torch.float16  # the default: half the file
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="hf:PATH"):
        precompute_teacher_features("vit", folder, ["captions.json"], tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ValueError, match="dtype='int8'"):
        precompute_teacher_features(f"hf:{clip}", folder, ["captions.json"], tmp_path / "x.safetensors",
                                    dtype="int8", progress=False)


def test_teacher_features_command_writes_what_a_features_teacher_reads(folder, tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from monovlm import cli

    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(clip)
    out = folder / "feats.safetensors"
    assert cli.main(["teacher", "features", "--teacher", f"hf:{clip}", "--data", str(folder), "--out", str(out),
                     "--files", "captions.json", "--files", "qa.json", "--no-progress"]) == 0
    stored = PrecomputedTeacher(out)
    keys = {record["image"] for name in ("captions.json", "qa.json")
            for record in json.loads((folder / name).read_text())}
    assert len(stored) == len(keys) > 0 and all(key in stored for key in keys)
    assert cli.main(["teacher", "features", "--teacher", f"hf:{clip}", "--data", str(folder),
                     "--out", str(tmp_path / "none.safetensors"), "--no-progress"]) == 2
    assert "--files" in capsys.readouterr().err
