"""The "qa" teacher objective: a ViT trained as the image tower of a short-answer classifier on a user's LLaVA QA."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.datasets import DatasetError, SkipReport
from monovlm.train.vit_pretrain import pretrain_vit
from monovlm.train.vit_qa import pretrain_vit_qa, read_qa_pairs

from image_folder import write_colour_qa

TINY = EncoderConfig(width=32, depth=1, heads=2, mlp_ratio=2.0)
VISION = VisionConfig(patch_size=8, merge=1, max_pixels=32 * 32)


@pytest.fixture(scope="module")
def colour_qa(tmp_path_factory):
    return write_colour_qa(tmp_path_factory.mktemp("colour_qa"))


def test_read_qa_pairs_takes_each_short_answer_and_skips_escaping_paths(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images/a.png")
    records = [
        {"image": "images/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "Star."},
            {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "dark red"},
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "a dark red star on grey"}]},
        {"image": "../outside.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "no"}]},
        {"conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    report = SkipReport()
    images, pairs = read_qa_pairs(tmp_path, ["data.json"], report)
    assert [image.key for image in images] == ["images/a.png"]
    assert [(p.image, p.question, p.answer) for p in pairs] == [
        (0, "<image>\nWhat shape?", "star"), (0, "And its colour?", "dark red")]  # the 5-word description is not
    assert report.reasons == {"image path escapes the root": 1}


def test_qa_teacher_learns_the_answers_from_the_image_and_is_deterministic(colour_qa):
    runs = []
    for seed in (0, 0):
        report = {}
        vit = pretrain_vit_qa(colour_qa, ["qa.json"], TINY, VISION, steps=60, images_per_batch=8, lr=3e-3, seed=seed,
                              progress=False, report=report)
        runs.append((vit, report))
    (vit_a, report_a), (vit_b, report_b) = runs
    assert report_a["questions"] == 60 and report_a["answers"] == 2 and report_a["left_out"] == 0
    assert report_a["images"] == 60
    # 3 held-out images (5%): the colour is in the pixels only, half the answers each way
    assert report_a["held_out_accuracy"] == 1.0
    right, asked = map(sum, zip(*report_a["held_out_by_answer"].values()))
    assert right == asked == len(report_a["held_out_predictions"])
    losses = report_a["losses"]
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert report_a["losses"] == report_b["losses"]
    for name, tensor in vit_a.state_dict().items():
        assert torch.equal(tensor, vit_b.state_dict()[name]), name
    assert not vit_a.training


def test_qa_objective_through_pretrain_vit_and_its_errors(colour_qa, tmp_path):
    report = {}
    vit = pretrain_vit(colour_qa, TINY, VISION, steps=2, objective="qa", sources=["qa.json"], progress=False,
                       report=report)
    assert vit.patch_size == 8 and len(report["losses"]) == 2
    captions = [{"image": "images/0.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red square on a dark noisy background."}]}]
    (colour_qa / "captions_only.json").write_text(json.dumps(captions))
    with pytest.raises(DatasetError, match="teacher_objective = 'mae'"):
        pretrain_vit(colour_qa, TINY, VISION, steps=1, objective="qa", sources=["captions_only.json"],
                     progress=False)
    with pytest.raises(DatasetError, match="nothere.json"):
        pretrain_vit(colour_qa, TINY, VISION, steps=1, objective="qa", sources=["nothere.json"], progress=False)
    linked = tmp_path / "linked"  # the images a link to another folder: every record skipped, and the error says so
    linked.mkdir()
    (linked / "images").symlink_to(colour_qa / "images")
    (linked / "qa.json").write_text((colour_qa / "qa.json").read_text())
    with pytest.raises(DatasetError, match=r"no usable question(.|\n)*image path escapes the root") as error:
        pretrain_vit(linked, TINY, VISION, steps=1, objective="qa", sources=["qa.json"], progress=False)
    assert "teacher_objective = 'mae'" not in str(error.value)


def test_qa_vit_teacher_through_build_teacher(colour_qa, tmp_path):
    from monovlm.train.recipe import AlignConfig

    from monovlm.model.teachers import TEACHER_SETTINGS_FILE, build_teacher

    align = AlignConfig(teacher="vit", teacher_objective="qa", teacher_width=16, teacher_depth=1, teacher_heads=2,
                        teacher_stem="patch", teacher_steps=3, teacher_lr=1e-3, teacher_patch_size=8, whiten=False,
                        whiten_images=8)
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    teacher = build_teacher(align, vision, colour_qa, tmp_path / "run", progress=False, sources=[("qa.json", None)])
    features = teacher([torch.zeros(3, 32, 32)])
    assert features[0].shape == (4, 4, 16)
    made_with = json.loads((tmp_path / "run" / "teacher" / TEACHER_SETTINGS_FILE).read_text())
    assert made_with["objective"] == "qa"


def test_the_pretrained_teacher_is_kept_when_only_the_students_embedder_changes(colour_qa, tmp_path, capsys):
    from monovlm.model.teachers import build_teacher
    from monovlm.train.recipe import AlignConfig

    align = AlignConfig(teacher="vit", teacher_objective="qa", teacher_width=16, teacher_depth=1, teacher_heads=2,
                        teacher_steps=3, teacher_patch_size=8, whiten=False)
    vision = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32)
    weights = tmp_path / "run" / "teacher" / "vit.safetensors"

    def build(vision: VisionConfig) -> bool:
        """Whether this build pretrained the teacher again."""
        build_teacher(align, vision, colour_qa, tmp_path / "run", progress=False, sources=[("qa.json", None)])
        return "pretraining the teacher again" in capsys.readouterr().out

    build(vision)
    first = weights.read_bytes()
    student = VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=32 * 32, stem="cnn",
                           embedder_width=64, embedder_context=3)
    assert not build(student)  # the student's stem, width and context: the teacher never reads them
    assert weights.read_bytes() == first
    assert build(VisionConfig(embedder="eve", patch_size=4, merge=2, max_pixels=48 * 48))  # its images change


def test_images_of_several_sizes_are_read_as_one_square(tmp_path):
    """A user's images come in many sizes: each is read whole at the largest patch-multiple square that fits
    max_pixels, so a batch is one tensor; the classifier still learns colours from them."""
    from monovlm.train.vit_qa import square_side, to_square

    root = write_colour_qa(tmp_path / "mixed", n=40)
    for index in range(0, 40, 3):  # every third image wider or taller than the rest
        path = root / f"images/{index}.png"
        image = Image.open(path)
        image.resize((48, 24) if index % 2 else (24, 40)).save(path)
    assert square_side(VISION) == 32 and square_side(VisionConfig(patch_size=8, max_pixels=50 * 50)) == 48
    wide = torch.rand(3, 24, 48)
    assert to_square(wide, 32).shape == (3, 32, 32)
    same = torch.rand(3, 32, 32)
    assert to_square(same, 32) is same
    report = {}
    pretrain_vit_qa(root, ["qa.json"], TINY, VISION, steps=60, images_per_batch=8, lr=3e-3, seed=0,
                    progress=False, report=report)
    assert report["images"] == 40 and np.mean(report["losses"][-5:]) < 0.5 * np.mean(report["losses"][:5])


def test_held_out_accuracy_is_split_by_answer_type_and_by_answer():
    from monovlm.train.vit_qa import held_out_by_answer, held_out_by_type

    predictions = [("Is it red?", "yes", "yes"), ("Is it blue?", "no", "yes"), ("What shape?", "star", "star"),
                   ("What shape?", "ring", "star"), ("What shape?", "ring", "star"), ("How many?", "2", "2")]
    assert held_out_by_type(predictions) == {"number": (1, 1), "other": (1, 3), "yes/no": (1, 2)}
    by_answer = held_out_by_answer(predictions)
    assert by_answer == {"ring": (0, 2), "yes": (1, 1), "no": (0, 1), "star": (1, 1), "2": (1, 1)}
    assert next(iter(by_answer)) == "ring"  # most asked first: a never-given answer stands out
