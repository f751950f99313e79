"""[align] teacher_questions: the "qa" teacher asks each training image yes/no questions drawn from the other images'
and answers them itself; stages with teacher_questions = true read them beside the data's own."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.image_files import DataImage
from monovlm.data.processor import Processor
from monovlm.model.teachers import TEACHER_QUESTIONS_FILE, TEACHER_SETTINGS_FILE, build_teacher
from monovlm.model.vit import load_vit
from monovlm.train.data import stage_dataset
from monovlm.train.recipe import AlignConfig, StageConfig, load_recipe
from monovlm.train.vit_qa import QAPair, QATask, ask_questions

from image_folder import COLOURS
from tiny_vlm import small_tokenizer

RED, BLUE = "<image>\nIs the square red?", "<image>\nIs the square blue?"
COLOUR, SHADE = "<image>\nWhat colour is the square?", "<image>\nWhich colour does the square have?"


def write_square_questions(root, n: int = 80, seed: int = 0):
    """n 32×32 images of a red or blue square (blue on every third); image i is asked one of the two colour
    questions (even i: the red one), so the other is there to ask. Returns root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for index in range(n):
        colour = "blue" if index % 3 == 0 else "red"
        pixels = rng.integers(0, 50, (32, 32, 3), dtype=np.uint8)
        top, left = rng.integers(0, 20, size=2)
        pixels[top:top + 12, left:left + 12] = COLOURS[colour]
        Image.fromarray(pixels).save(root / f"images/{index}.png")
        question = RED if index % 2 == 0 else BLUE
        answer = "yes" if (question == RED) == (colour == "red") else "no"
        records.append({"id": str(index), "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    (root / "qa.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return write_square_questions(tmp_path_factory.mktemp("squares"))


def scripted_task(images: int = 40):
    """Image i asked "red?" (yes on even i) and, on every fourth image, "blue?" (yes on i = 0 mod 8, else no): each
    wording says yes half the time. The scripted classifiers below answer from the pixels, which are the index."""
    by_image = {}
    for i in range(images):
        pairs = [QAPair(i, RED, "yes" if i % 2 == 0 else "no")]
        if i % 4 == 0:
            pairs.append(QAPair(i, BLUE, "yes" if i % 8 == 0 else "no"))
        by_image[i] = pairs
    return QATask([DataImage(f"images/{i}.png", None) for i in range(images)], by_image, ["yes", "no"],
                  {"yes": 0, "no": 1}, 0)


def pixels_of(indices):
    return [torch.tensor(float(i)) for i in indices]


def squares_teacher() -> tuple[AlignConfig, VisionConfig]:
    """A tiny "qa" teacher for the squares, asking one question of each image."""
    align = AlignConfig(teacher="vit", teacher_objective="qa", teacher_width=32, teacher_depth=1, teacher_heads=2,
                        teacher_stem="patch", teacher_steps=80, teacher_lr=3e-3, teacher_patch_size=8,
                        teacher_questions=1, teacher_confidence=0.8)
    return align, VisionConfig(embedder="eve", patch_size=8, merge=1, max_pixels=32 * 32)


def right_answer(question: str, image: str) -> str:
    """The squares' true answer to a colour question about images/N.png (blue on every third)."""
    colour = "blue" if int(image.split("/")[1].split(".")[0]) % 3 == 0 else "red"
    return "yes" if (question == RED) == (colour == "red") else "no"


def test_asked_questions_are_new_to_the_image_and_confidently_answered():
    task = scripted_task()
    calls = []

    def logits_of(pixels, pairs, owner):  # sure "no" on images 1 (mod 4), sure "yes" on 2, unsure on 3
        calls.append(len(pixels))
        rows = []
        for pair, row in zip(pairs, owner.tolist()):
            image = int(pixels[row])
            assert image == pair.image  # each question is asked of its own image's pixels
            p_yes = {1: 0.01, 2: 0.99, 3: 0.6}.get(image % 4, 0.5)
            rows.append([p_yes, 1 - p_yes])
        return torch.tensor(rows).log()

    records = ask_questions(task, pixels_of, logits_of, per_image=2, confidence=0.9)
    assert calls and max(calls) <= 32  # a few images at a time
    # every image was asked "red?": only "blue?" is new, to the images not asked it (i != 0 mod 4); those with
    # an unsure answer (3 mod 4) are left out; 10 sure yes and 10 sure no keep the data's share of 1/2
    images = sorted(int(r["image"].split("/")[1].split(".")[0]) for r in records)
    assert images == [i for i in range(40) if i % 4 in (1, 2)]
    for record in records:
        image = int(record["image"].split("/")[1].split(".")[0])
        assert [t["value"] for t in record["conversations"]] == [BLUE, "yes" if image % 4 == 2 else "no"]
        assert record["conversations"][0]["from"] == "human" and record["conversations"][1]["from"] == "gpt"
    assert len({r["id"] for r in records}) == len(records)


def test_the_kept_answers_have_the_datas_yes_share_per_wording():
    task = scripted_task()  # "red?": yes on 20 of 40 images; asked of new images below
    for i in range(40, 80):  # 40 more images, asked only "blue?"
        task.by_image[i] = [QAPair(i, BLUE, "no" if i % 3 else "yes")]
        task.images.append(DataImage(f"images/{i}.png", None))

    def logits_of(pixels, pairs, owner):  # a sure teacher: "yes" to "red?" on 3 images of 4
        rows = [[0.99, 0.01] if int(pixels[row]) % 4 else [0.01, 0.99] for row in owner.tolist()]
        return torch.tensor(rows).log()

    records = ask_questions(task, pixels_of, logits_of, per_image=1, confidence=0.9)
    red = [r["conversations"][1]["value"] for r in records if r["conversations"][0]["value"] == RED]
    # 40 new images asked "red?": 30 sure yes, 10 sure no; the data's share is 1/2, so 10 of each are kept
    assert red.count("yes") == red.count("no") == 10
    assert all(r["image"] in {f"images/{i}.png" for i in range(40, 80)} for r in records
               if r["conversations"][0]["value"] == RED)


@pytest.mark.parametrize("even", [False, True])
def test_even_answers_keep_half_yes_in_each_wording(even):
    """"red?" is yes on a quarter of the data's images; a sure teacher says yes to it on 30 of 40 new ones. Kept in
    the data's share: 3 yes beside the 10 no; `even`: 10 and 10, so the wording predicts none of the teacher's."""
    task = QATask([DataImage(f"images/{i}.png", None) for i in range(80)],
                  {i: [QAPair(i, RED, "yes" if i % 4 == 0 else "no")] if i < 40
                   else [QAPair(i, BLUE, "no" if i % 3 else "yes")] for i in range(80)},
                  ["yes", "no"], {"yes": 0, "no": 1}, 0)

    def logits_of(pixels, pairs, owner):
        rows = [[0.99, 0.01] if int(pixels[row]) % 4 else [0.01, 0.99] for row in owner.tolist()]
        return torch.tensor(rows).log()

    records = ask_questions(task, pixels_of, logits_of, per_image=1, confidence=0.9, even=even)
    red = [r["conversations"][1]["value"] for r in records if r["conversations"][0]["value"] == RED]
    assert (red.count("yes"), red.count("no")) == ((10, 10) if even else (3, 10))


def test_a_qa_teacher_writes_right_answers_to_new_questions(squares, tmp_path, capsys):
    align, vision = squares_teacher()
    build_teacher(align, vision, squares, tmp_path / "run", progress=False, sources=[("qa.json", None)])
    folder = tmp_path / "run" / "teacher"
    asked = json.loads((folder / TEACHER_QUESTIONS_FILE).read_text())
    data = {r["image"]: r["conversations"][0]["value"] for r in json.loads((squares / "qa.json").read_text())}
    assert len(asked) >= 20
    right = 0
    for record in asked:
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question in (RED, BLUE) and question != data[record["image"]]  # the other colour's question
        right += answer == right_answer(question, record["image"])
    assert right / len(asked) >= 0.9
    made_with = json.loads((folder / TEACHER_SETTINGS_FILE).read_text())
    assert made_with["questions"] == {"per_image": 1, "confidence": 0.8}
    assert "asked 1 yes/no and 0 open questions of each image" in capsys.readouterr().out
    report = json.loads((folder / "pretrain_report.json").read_text())
    assert "teacher_questions" not in report  # they have their own file

    # the same settings keep the teacher and its questions; another number of questions, or another share of yes,
    # pretrains it again
    build_teacher(align, vision, squares, tmp_path / "run", progress=False, sources=[("qa.json", None)])
    assert "pretraining the teacher again" not in capsys.readouterr().out
    align.teacher_questions = 2
    build_teacher(align, vision, squares, tmp_path / "run", progress=False, sources=[("qa.json", None)])
    assert "pretraining the teacher again" in capsys.readouterr().out
    align.teacher_yes_share = "even"
    build_teacher(align, vision, squares, tmp_path / "run", progress=False, sources=[("qa.json", None)])
    assert "pretraining the teacher again" in capsys.readouterr().out
    made_with = json.loads((folder / TEACHER_SETTINGS_FILE).read_text())
    assert made_with["questions"] == {"per_image": 2, "confidence": 0.8, "yes_share": "even"}


def test_a_qa_teacher_pretrained_under_bf16_autocast_answers_as_well(squares, tmp_path):
    """The trainer pretrains a "qa" teacher under bf16 autocast where the CPU has native bf16 (about 1.5× faster);
    the weights stay float32 and the answers stay right."""
    align, vision = squares_teacher()
    build_teacher(align, vision, squares, tmp_path / "run", progress=False, sources=[("qa.json", None)],
                  pretrain_dtype=torch.bfloat16)
    folder = tmp_path / "run" / "teacher"
    report = json.loads((folder / "pretrain_report.json").read_text())
    assert report["dtype"] == "torch.bfloat16" and report["held_out_accuracy"] >= 0.9
    assert all(p.dtype == torch.float32 for p in load_vit(folder).parameters())
    asked = json.loads((folder / TEACHER_QUESTIONS_FILE).read_text())
    right = sum(reply["value"] == right_answer(question["value"], record["image"])
                for record in asked for question, reply in [record["conversations"]])
    assert len(asked) >= 20 and right / len(asked) >= 0.9


def test_a_stage_reads_the_teachers_questions_with_each_images_own(squares, tmp_path):
    asked = [{"id": "t0", "image": "images/0.png", "conversations": [
        {"from": "human", "value": BLUE}, {"from": "gpt", "value": "no"}]},
        {"id": "t1", "image": "images/elsewhere.png", "conversations": [
            {"from": "human", "value": RED}, {"from": "gpt", "value": "yes"}]},
        {"id": "t2", "image": "images/0.png", "conversations": [
            {"from": "human", "value": COLOUR}, {"from": "gpt", "value": "red"}]}]
    path = tmp_path / TEACHER_QUESTIONS_FILE
    path.write_text(json.dumps(asked))
    processor = Processor(small_tokenizer(), VisionConfig(embedder="eve", patch_size=8, merge=1, max_pixels=32 * 32))

    def records(**options):
        stage = StageConfig(name="s", data="qa.json", group_by_image=True, **options)
        return stage_dataset(stage, processor, squares, teacher_questions=path).records

    def pairs_of(records_, image="images/0.png"):
        first = next(r for r in records_ if r["image"] == image)
        values = [t["value"].replace("<image>\n", "") for t in first["conversations"]]
        return sorted(zip(values[::2], values[1::2]))

    red, blue, colour = ("Is the square red?", "no"), ("Is the square blue?", "no"), ("What colour is the square?", "red")
    with_teacher = records(teacher_questions=True)
    assert pairs_of(with_teacher) == [blue, red, colour]
    assert all(r["image"] != "images/elsewhere.png" for r in with_teacher)  # not an image of this file
    plain = records()
    assert sum(len(r["conversations"]) for r in with_teacher) == sum(len(r["conversations"]) for r in plain) + 4
    assert pairs_of(records(teacher_questions="yes/no")) == [blue, red]  # one kind of the teacher's questions
    assert pairs_of(records(teacher_questions="open")) == [red, colour]
    assert records(yes_no="open") == []  # every question of the data here is yes/no: all left out
    # in "open" the teacher's open questions stay; its yes/no go too, unless its answers are even (then the wording
    # predicts none of them); they are left in their own records (one per image)
    assert [(r["image"], r["conversations"]) for r in records(teacher_questions=True, yes_no="open")] == [
        ("images/0.png", asked[2]["conversations"])]
    even = stage_dataset(StageConfig(name="s", data="qa.json", group_by_image=True, teacher_questions="yes/no",
                                     yes_no="open"), processor, squares, teacher_questions=path,
                         even_teacher_answers=True).records
    assert [(r["image"], r["conversations"]) for r in even] == [("images/0.png", asked[0]["conversations"])]
    with pytest.raises(FileNotFoundError, match="teacher_questions"):
        stage_dataset(StageConfig(name="s", data="qa.json", teacher_questions=True), processor, squares,
                      teacher_questions=tmp_path / "missing.json")


def test_recipe_errors_name_what_is_missing():
    with pytest.raises(ConfigError, match="teacher_objective"):
        load_recipe("eve", ["align.teacher_questions=4"])  # eve's teacher learns by masked patches
    with pytest.raises(ConfigError, match=r"\[align\] teacher_questions and teacher_open_questions are 0"):
        load_recipe("eve-vqa", ["stages.instruct.teacher_questions=true", "align.teacher_questions=0",
                                "align.teacher_open_questions=0"])
    with pytest.raises(ConfigError, match="teacher_confidence"):
        load_recipe("eve-vqa", ["align.teacher_questions=4", "align.teacher_confidence=0"])
    with pytest.raises(ConfigError, match="teacher_yes_share"):
        load_recipe("eve-vqa", ["align.teacher_questions=4", "align.teacher_yes_share=balanced"])
    with pytest.raises(ConfigError, match=r"\[.open.\].*teacher_yes_share = \"even\""):
        load_recipe("eve-vqa", ["align.teacher_questions=4", "align.teacher_open_questions=0",
                                "stages.open.teacher_questions=true"])
    load_recipe("eve-vqa", ["align.teacher_questions=4", "align.teacher_open_questions=0",
                            "stages.open.teacher_questions=true", "align.teacher_yes_share=even"])
    # the teacher's open questions are what a stage without yes/no reads
    load_recipe("eve-vqa", ["align.teacher_open_questions=2", "stages.open.teacher_questions=true"])
    with pytest.raises(ConfigError, match=r"\[.open.\].*teacher_yes_share = \"even\""):  # its yes/no only
        load_recipe("eve-vqa", ["align.teacher_open_questions=2", "stages.open.teacher_questions=yes/no"])
    with pytest.raises(ConfigError, match="teacher_questions='some'"):
        load_recipe("eve-vqa", ["stages.instruct.teacher_questions=some"])
    with pytest.raises(ConfigError, match="teacher_open_questions=-1"):
        load_recipe("eve-vqa", ["align.teacher_open_questions=-1"])
    with pytest.raises(ConfigError, match="teacher_objective"):
        load_recipe("eve", ["align.teacher_open_questions=2"])


def test_a_question_asked_in_a_later_turn_is_not_asked_again():
    task = scripted_task(8)
    for i in range(8):  # every image asked "blue?" too, in a later turn: no marker
        task.by_image[i] = [QAPair(i, RED, "yes"), QAPair(i, BLUE.replace("<image>\n", ""), "no")] * 5

    def logits_of(pixels, pairs, owner):
        raise AssertionError(f"nothing is left to ask, yet {[p.question for p in pairs]} were asked")

    assert ask_questions(task, pixels_of, logits_of, per_image=3, confidence=0.5) == []



def test_open_questions_are_new_to_the_image_and_kept_when_the_teacher_is_sure():
    """Image i was asked one of two colour wordings (even i: COLOUR); the other is asked of it. The scripted classifier
    is sure on i = 1, 2 (mod 4) (blue on multiples of 3, else red) and unsure on the rest; a yes/no answer class
    is never given to an open question."""
    images = 40
    task = QATask([DataImage(f"images/{i}.png", None) for i in range(images)],
                  {i: [QAPair(i, COLOUR if i % 2 == 0 else SHADE, "blue" if i % 3 == 0 else "red")]
                   for i in range(images)},
                  ["red", "blue", "yes", "no"], {"red": 0, "blue": 1, "yes": 2, "no": 3}, 0)

    def logits_of(pixels, pairs, owner):
        rows = []
        for pair, row in zip(pairs, owner.tolist()):
            image = int(pixels[row])
            if pair.question == RED:  # a sure yes on even images, a sure no on odd ones
                rows.append([0.01, 0.01, 0.97, 0.01] if image % 2 == 0 else [0.01, 0.01, 0.01, 0.97])
                continue
            sure = image % 4 in (1, 2)
            p_blue = (0.97 if image % 3 == 0 else 0.02) if sure else 0.5
            rows.append([(1 - p_blue) * 0.99, p_blue * 0.99, 0.005, 0.005])
        return torch.tensor(rows).log()

    records = ask_questions(task, pixels_of, logits_of, per_image=0, confidence=0.9, open_per_image=1)
    asked = {int(r["image"].split("/")[1].split(".")[0]): r["conversations"] for r in records}
    assert sorted(asked) == [i for i in range(images) if i % 4 in (1, 2)]  # the unsure ones are left out
    for image, (question, reply) in asked.items():
        assert question["value"] == (SHADE if image % 2 == 0 else COLOUR)  # the wording it was not asked
        assert reply["value"] == ("blue" if image % 3 == 0 else "red")
    # beside yes/no questions (images 0 and 1 were asked "red?": yes, no): each kind drawn from its own pool
    task.by_image[0].append(QAPair(0, RED, "yes"))
    task.by_image[1].append(QAPair(1, RED, "no"))
    mixed = ask_questions(task, pixels_of, logits_of, per_image=1, confidence=0.9, open_per_image=1)
    yes_no = [r for r in mixed if r["conversations"][0]["value"] == RED]
    assert {r["image"] for r in yes_no} <= {f"images/{i}.png" for i in range(2, images)}
    assert all(r["conversations"][1]["value"] == ("yes" if int(r["image"].split("/")[1].split(".")[0]) % 2 == 0
                                                  else "no") for r in yes_no)
    assert len(yes_no) >= 30  # 19 sure yes and 19 sure no, kept in the data's share of 1/2
    opened = sorted((r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"])
                    for r in mixed if r not in yes_no)
    assert opened == sorted((r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"])
                            for r in records)  # the same open questions and answers as asked alone


def write_colour_questions(root, n: int = 80, seed: int = 0):
    """The squares again, but every fourth image (i = 3 mod 4) has none: it is asked "Is the square red?" (no); the
    others are asked their square's colour, in one wording on even i ("What colour is the square?"), in the other on
    odd i.
    Returns root."""
    write_square_questions(root, n, seed)
    records = []
    for index in range(n):
        if index % 4 == 3:
            Image.fromarray(np.random.default_rng(index).integers(0, 50, (32, 32, 3), dtype=np.uint8)).save(
                root / f"images/{index}.png")
            question, answer = RED, "no"
        else:
            question, answer = COLOUR if index % 2 == 0 else SHADE, "blue" if index % 3 == 0 else "red"
        records.append({"id": str(index), "image": f"images/{index}.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    (root / "colours.json").write_text(json.dumps(records))
    return root


def test_a_qa_teacher_answers_open_questions_right_and_not_those_about_what_is_absent(tmp_path, capsys):
    """Asked of an image without a square, "What colour is the square?" has no answer; a teacher without the
    "unanswerable" class gives one anyway (it kept all 20 such questions), this one keeps none of them."""
    root = write_colour_questions(tmp_path / "data")
    align, vision = squares_teacher()
    align.teacher_questions, align.teacher_open_questions, align.teacher_steps = 0, 1, 400
    build_teacher(align, vision, root, tmp_path / "run", progress=False, sources=[("colours.json", None)])
    folder = tmp_path / "run" / "teacher"
    asked = json.loads((folder / TEACHER_QUESTIONS_FILE).read_text())
    index = {record["id"]: int(record["image"].split("/")[1].split(".")[0]) for record in asked}
    assert [record for record in asked if index[record["id"]] % 4 == 3] == []  # none about the blank images
    assert len(asked) >= 30  # of the 60 with a square
    for record in asked:
        question, reply = (turn["value"] for turn in record["conversations"])
        assert question == (SHADE if index[record["id"]] % 2 == 0 else COLOUR)  # the wording not asked of it
        assert reply == ("blue" if index[record["id"]] % 3 == 0 else "red")
    report = json.loads((folder / "pretrain_report.json").read_text())
    assert 0.0 <= report["unanswerable_own"] <= 1.0 and 0.0 <= report["unanswerable_drawn"] <= 1.0
    assert report["answers"] == 3  # the answer classes (red, blue, no), not the kinds of reply it kept
    made_with = json.loads((folder / TEACHER_SETTINGS_FILE).read_text())
    assert made_with["questions"] == {"per_image": 0, "confidence": 0.8, "open_per_image": 1}
    assert "asked 0 yes/no and 1 open questions of each image" in capsys.readouterr().out
