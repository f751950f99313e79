"""Benchmark readers: exact samples from tiny fixtures of each format, bad records skipped and counted by reason,
bad files refused by name. Image files are empty: readers only check that they exist."""

import json
import os
from pathlib import Path

import pytest

from monovlm.data.datasets import DatasetError
from monovlm.data.synthetic import CATEGORIES, POPE_SPLITS, synthesize
from monovlm.eval.readers import (
    CAPTION_PROMPT,
    READERS,
    read,
    read_coco_captions,
    read_gqa,
    read_llava,
    read_mme,
    read_pope,
    read_synthetic,
    read_vqav2,
)
from monovlm.eval.samples import EvalSample


def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def reasons(result) -> dict[str, int]:
    return dict(result.skipped.reasons)


# ---------------------------------------------------------------------------------------------------------------
# VQAv2


def _vqa_answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


@pytest.fixture
def vqa(tmp_path):
    images = touch(tmp_path / "val2014", "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg")
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "What color is the cat?", "question_id": 10},
            {"image_id": 2, "question": "<image>\nHow many dogs?", "question_id": 20},
            {"image_id": 3, "question": "Is it raining?", "question_id": 30},  # image not on disk
            {"image_id": 1, "question_id": 40},  # no question
            {"image_id": 1, "question": "Where?", "question_id": 50},  # no annotation
            {"image_id": 1, "question": "Again?", "question_id": 10},  # duplicate id
            "not an object",
            {"image_id": 1, "question": "Which?", "question_id": 60},  # annotation answer without text
            {"image_id": "1", "question": "Who?", "question_id": 70},  # image_id not an integer
        ],
    })
    white = ["white"] * 7 + ["gray", "grey", " white\n"]
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 10, "image_id": 1, "answers": _vqa_answers(*white), "multiple_choice_answer": "white",
         "answer_type": "other", "question_type": "what color is the"},
        {"question_id": 20, "image_id": 2, "answers": _vqa_answers(*["2"] * 9, "two"), "multiple_choice_answer": "2",
         "answer_type": "number", "question_type": "how many"},
        {"question_id": 30, "image_id": 3, "answers": _vqa_answers(*["no"] * 10), "answer_type": "yes/no"},
        {"question_id": 60, "image_id": 1, "answers": [{"answer": 3}] * 10, "answer_type": "other"},
        {"image_id": 1, "answers": []},  # belongs to no question
    ]})
    return tmp_path, images, questions, annotations


def test_vqav2_exact_samples_and_skips(vqa):
    _, images, questions, annotations = vqa
    result = read_vqav2(questions, annotations, image_root=images)
    assert result.samples == [
        EvalSample(id="10", question="What color is the cat?", image=images / "COCO_val2014_000000000001.jpg",
                   answers=["white"] * 7 + ["gray", "grey", "white"], category="other",
                   meta={"question_id": 10, "image_id": 1, "question_type": "what color is the",
                         "answer_type": "other", "multiple_choice_answer": "white"}),
        EvalSample(id="20", question="How many dogs?", image=images / "COCO_val2014_000000000002.jpg",
                   answers=["2"] * 9 + ["two"], category="number",
                   meta={"question_id": 20, "image_id": 2, "question_type": "how many",
                         "answer_type": "number", "multiple_choice_answer": "2"}),
    ]
    assert reasons(result) == {"invalid annotation": 2, "image missing": 1, "missing question": 1,
                               "no annotation": 1, "duplicate id": 1, "malformed record": 1, "invalid image_id": 1}
    assert result.skipped.total == 2 + 8
    name = "v2_OpenEnded_mscoco_val2014_questions.json"
    assert [(item.where, item.reason) for item in result.skipped.examples] == [
        ("v2_mscoco_val2014_annotations.json annotation 4", "invalid annotation"),  # counted when the file is read
        (f"{name} question 2 (question_id=30)", "image missing"),
        (f"{name} question 3 (question_id=40)", "missing question"),
        (f"{name} question 4 (question_id=50)", "no annotation"),
        (f"{name} question 5 (question_id=10)", "duplicate id"),
        (f"{name} question 6", "malformed record"),
        (f"{name} question 7 (question_id=60)", "invalid annotation"),
        (f"{name} question 8 (question_id=70)", "invalid image_id"),
    ]
    assert "COCO_val2014_000000000003.jpg" in result.skipped.summary()


def test_vqav2_without_annotations_and_limit(vqa):
    _, images, questions, _ = vqa
    result = read_vqav2(questions, image_root=images, limit=2)
    assert [(s.id, s.answers, s.category, s.meta) for s in result.samples] == [
        ("10", [], "all", {"question_id": 10, "image_id": 1}),
        ("20", [], "all", {"question_id": 20, "image_id": 2}),
    ]
    assert result.skipped.total == 2 and not result.skipped.skipped  # stops at the limit: nothing after it counted


def test_vqav2_image_split_from_file_name_test_dev(tmp_path):
    touch(tmp_path, "COCO_test2015_000000000007.jpg")
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                           {"questions": [{"image_id": 7, "question": "What?", "question_id": 70}]})
    assert [s.image for s in read_vqav2(questions).samples] == [tmp_path / "COCO_test2015_000000000007.jpg"]
    unnamed = write_json(tmp_path / "questions.json", {"questions": []})
    with pytest.raises(DatasetError, match="image split.*image_split"):
        read_vqav2(unnamed)
    assert read_vqav2(unnamed, image_split="val2014").samples == []


# ---------------------------------------------------------------------------------------------------------------
# GQA


def test_gqa_exact_samples_and_skips(tmp_path):
    images = touch(tmp_path / "images", "n1.jpg", "n2.jpg")
    questions = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "202": {"imageId": "n2", "question": "What is on the table?", "answer": "cup"},  # no types
        "203": {"imageId": "n3", "question": "Where?", "answer": "left", "types": {"structural": "query"}},
        "204": {"imageId": "n1", "question": "Which?"},  # no answer (test split)
        "205": ["not", "an", "object"],
        "206": {"imageId": 5, "question": "Who?", "answer": "man"},
    })
    result = read_gqa(questions, image_root=images)
    assert result.samples == [
        EvalSample(id="201", question="Is the sky blue?", image=images / "n1.jpg", answers=["yes"], category="verify",
                   meta={"image_id": "n1", "full_answer": "Yes, it is.", "semantic": "attr", "detailed": "verifyAttr"}),
        EvalSample(id="202", question="What is on the table?", image=images / "n2.jpg", answers=["cup"],
                   category="all", meta={"image_id": "n2", "full_answer": None, "semantic": None, "detailed": None}),
    ]
    assert reasons(result) == {"image missing": 1, "missing answer": 1, "malformed record": 1, "invalid imageId": 1}
    with pytest.raises(DatasetError, match="must be a JSON object"):
        read_gqa(write_json(tmp_path / "list.json", []), image_root=images)


# ---------------------------------------------------------------------------------------------------------------
# POPE


@pytest.fixture
def pope(tmp_path):
    images = touch(tmp_path / "val2014", "a.jpg", "b.jpg")
    touch(tmp_path, "outside.jpg")
    path = write_lines(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "No "},
        {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes",
         "category": "popular"},
        "{not json",
        {"question_id": 4, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "maybe"},
        {"question_id": 5, "image": "c.jpg", "text": "Is there a cup in the image?", "label": "no"},
        {"question_id": 6, "image": "../outside.jpg", "text": "Is there a pen in the image?", "label": "no"},
        "",
        {"image": "a.jpg", "text": "Is there a hat in the image?", "label": "no"},
        {"question_id": 7, "image": "a.jpg", "label": "no"},
    ])
    return images, path


def test_pope_exact_samples_and_skips(pope):
    images, path = pope
    result = read_pope(path, image_root=images)
    assert result.samples == [
        EvalSample(id="1", question="Is there a dog in the image?", image=images / "a.jpg", answers=["yes"],
                   category="random", meta={"question_id": 1, "label": "yes"}),
        EvalSample(id="2", question="Is there a cat in the image?", image=images / "a.jpg", answers=["no"],
                   category="random", meta={"question_id": 2, "label": "no"}),
        EvalSample(id="3", question="Is there a car in the image?", image=images / "b.jpg", answers=["yes"],
                   category="popular", meta={"question_id": 3, "label": "yes"}),
    ]
    assert reasons(result) == {"malformed line": 1, "invalid label": 1, "image missing": 1,
                               "image path escapes root": 1, "missing question_id": 1, "missing question": 1}
    assert [item.where for item in result.skipped.examples][:2] == [
        "coco_pope_random.json line 4", "coco_pope_random.json line 5 (question_id=4)"]


def test_pope_split_argument_json_list_and_lmms_eval_columns(tmp_path):
    touch(tmp_path, "a.jpg")
    path = write_json(tmp_path / "pope.json", [
        {"question_id": "q1", "image": "a.jpg", "question": "Is there a dog in the image?", "answer": "YES"},
    ])
    assert [(s.id, s.question, s.answers, s.category) for s in read_pope(path).samples] == [
        ("q1", "Is there a dog in the image?", ["yes"], "all")]
    assert read_pope(path, split="adversarial").samples[0].category == "adversarial"


# ---------------------------------------------------------------------------------------------------------------
# MME


@pytest.fixture
def mme_release(tmp_path):
    root = tmp_path / "MME_Benchmark"
    touch(root / "artwork" / "images", "10002.jpg")
    answers = touch(root / "artwork" / "questions_answers_YN")
    (answers / "10002.txt").write_text(
        "Is this a painting? Please answer yes or no.\tYes\r\nIs this glassware? Please answer yes or no.\tNo\n\n")
    (answers / "10003.txt").write_text("Q1?\tYes\nQ2?\tNo\n")  # its image is missing: both questions skipped
    ocr = touch(root / "OCR", "0001.png")
    (ocr / "0001.txt").write_text('Is the word "angie\'s"? Please answer yes or no.\tYes\nno tab here\nSecond?\tNo\n')
    (ocr / "0002.txt").write_bytes(b"\xff\xfe\x00bad utf-8")
    touch(root / "unrelated")  # a folder without question files is not a subtask
    return root


def test_mme_release_folder_exact_samples_and_skips(mme_release):
    root = mme_release
    result = read_mme(root)
    ocr, art = root / "OCR" / "0001.png", root / "artwork" / "images" / "10002.jpg"
    assert result.samples == [
        EvalSample(id="OCR/0001.png:0", question='Is the word "angie\'s"? Please answer yes or no.', image=ocr,
                   answers=["Yes"], category="OCR", meta={"image_key": "OCR/0001.png"}),
        EvalSample(id="OCR/0001.png:2", question="Second?", image=ocr, answers=["No"], category="OCR",
                   meta={"image_key": "OCR/0001.png"}),
        EvalSample(id="artwork/10002.jpg:0", question="Is this a painting? Please answer yes or no.", image=art,
                   answers=["Yes"], category="artwork", meta={"image_key": "artwork/10002.jpg"}),
        EvalSample(id="artwork/10002.jpg:1", question="Is this glassware? Please answer yes or no.", image=art,
                   answers=["No"], category="artwork", meta={"image_key": "artwork/10002.jpg"}),
    ]
    assert reasons(result) == {"malformed line": 1, "unreadable question file": 1, "image missing": 2}
    assert [s.id for s in read_mme(root, limit=3).samples] == ["OCR/0001.png:0", "OCR/0001.png:2",
                                                                "artwork/10002.jpg:0"]


def test_mme_folder_errors(tmp_path, mme_release):
    with pytest.raises(DatasetError, match="no MME subtask folders"):
        read_mme(touch(tmp_path / "empty"))
    with pytest.raises(ValueError, match="image_root applies to an MME TSV only"):
        read_mme(mme_release, image_root=tmp_path)


def test_mme_tsv_exact_samples_and_skips(tmp_path):
    images = touch(tmp_path / "images", "1.jpg", "2.png")
    path = tmp_path / "MME.tsv"
    path.write_text(
        "index\tcategory\timage_path\tquestion\tanswer\n"
        '0\tOCR\t1.jpg\t"Is the word ""angie\'s""? Please answer yes or no."\tYes\n'
        "1\tcount\t2.png\tAre there two dogs?\tNo\n"
        "2\tcount\t3.png\tAre there three dogs?\tNo\n"  # image missing
        "3\tcount\t2.png\tToo few fields\n"
        "\n"
        f"4\tcolor\t{'A' * 2000}\tIs it red?\tYes\n"  # inline base64 instead of a path
        "1\tcolor\t1.jpg\tDuplicate index?\tYes\n"
    )
    result = read_mme(path, image_root=images)
    assert result.samples == [
        EvalSample(id="0", question='Is the word "angie\'s"? Please answer yes or no.', image=images / "1.jpg",
                   answers=["Yes"], category="OCR", meta={"image_key": "1.jpg"}),
        EvalSample(id="1", question="Are there two dogs?", image=images / "2.png", answers=["No"], category="count",
                   meta={"image_key": "2.png"}),
    ]
    assert reasons(result) == {"image missing": 1, "malformed row": 1, "inline image data": 1, "duplicate id": 1}
    assert [item.where for item in result.skipped.examples] == [f"MME.tsv line {n}" for n in (4, 5, 7, 8)]


def test_mme_tsv_question_id_image_key_and_missing_columns(tmp_path):
    touch(tmp_path / "count", "9.png")
    path = tmp_path / "mme.tsv"
    path.write_text("question_id\timage\tquestion\tanswer\n"
                    "count/9.png\tcount/9.png\tTwo?\tYes\n"
                    "count/9.png\tcount/9.png\tThree?\tNo\n")
    result = read_mme(path)
    assert [(s.id, s.image, s.category, s.meta) for s in result.samples] == [
        ("count/9.png:0", tmp_path / "count" / "9.png", "all", {"image_key": "count/9.png"}),
        ("count/9.png:1", tmp_path / "count" / "9.png", "all", {"image_key": "count/9.png"}),
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\timage\tquestion\n0\t9.png\tTwo?\n")
    with pytest.raises(DatasetError, match=r"bad.tsv lacks the column\(s\) answer; it has index, image, question"):
        read_mme(bad)


# ---------------------------------------------------------------------------------------------------------------
# COCO captions


def test_coco_captions_exact_samples_and_skips(tmp_path):
    images = touch(tmp_path / "val2014", "a.jpg", "b.jpg", "d.jpg")
    path = write_json(tmp_path / "captions_val2014.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"},
                   {"id": 4, "file_name": "d.jpg"}, {"id": 1, "file_name": "a.jpg"}, {"file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 11, "caption": "A cat on a mat.\n"},
            {"image_id": 3, "id": 12, "caption": "A dog."},
            {"image_id": 1, "id": 13, "caption": " A sleeping cat."},
            {"image_id": 4, "id": 14, "caption": "A bird."},
            {"image_id": 4, "id": 15, "caption": 5},  # a bad reference: image 4 skipped, not scored on fewer refs
            {"id": 16, "caption": "Whose caption?"},  # belongs to no image
            {"image_id": 99, "id": 17, "caption": "Not in this set."},  # ignored: image 99 is not listed
        ],
    })
    result = read_coco_captions(path, image_root=images)
    assert result.samples == [
        EvalSample(id="1", question=CAPTION_PROMPT, image=images / "a.jpg",
                   answers=["A cat on a mat.", "A sleeping cat."], meta={"image_id": 1, "file_name": "a.jpg"}),
    ]
    assert reasons(result) == {"invalid annotation": 1, "no captions": 1, "image missing": 1, "invalid caption": 1,
                               "duplicate id": 1, "missing id": 1}
    assert read_coco_captions(path, image_root=images, prompt="Describe.", limit=1).samples[0].question == "Describe."
    with pytest.raises(DatasetError, match="no 'annotations' list"):
        read_coco_captions(write_json(tmp_path / "image_info_test2014.json", {"images": []}))


# ---------------------------------------------------------------------------------------------------------------
# LLaVA format


def _turns(question, answer=None):
    turns = [{"from": "human", "value": question}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


LLAVA_RECORDS = [
    {"id": "a", "image": "x.png", "conversations": _turns("<image>\nWhat is it?", "a cat "), "category": "animals",
     "source": "web"},
    {"id": "b", "conversations": _turns("Text only?", "yes"), "answers": ["yes", "yeah"]},
    {"images": ["x.png"], "conversations": _turns("<image>\nWhich colour? A. red B. blue", "A"),
     "choices": ["red", "blue"]},  # no id: its position
    {"id": "d", "image": "missing.png", "conversations": _turns("<image>\nWhat?", "no")},
    {"id": "e", "image": "x.png", "conversations": _turns("<image>", "caption")},
    {"id": "f", "conversations": _turns("Q?")},
    "[1, 2",
    {"id": "g", "images": ["x.png", "x.png"], "conversations": _turns("<image><image>\nSame?", "yes")},
    {"id": "h", "conversations": _turns("Q?", "A"), "category": 5},
    {"id": "i", "question": "Own question?", "answer": "own", "conversations": _turns("ignored", "ignored")},
]


def test_llava_exact_samples_and_skips(tmp_path):
    touch(tmp_path, "x.png")
    path = write_lines(tmp_path / "eval.jsonl", LLAVA_RECORDS)
    result = read_llava(path)
    assert result.samples == [
        EvalSample(id="a", question="What is it?", image=tmp_path / "x.png", answers=["a cat"], category="animals",
                   meta={"source": "web"}),
        EvalSample(id="b", question="Text only?", image=None, answers=["yes", "yeah"], category="yes/no"),
        EvalSample(id="2", question="Which colour? A. red B. blue", image=tmp_path / "x.png", answers=["A"],
                   category="multiple choice", choices=["red", "blue"]),
        EvalSample(id="i", question="Own question?", image=None, answers=["own"], category="other"),
    ]
    assert reasons(result) == {"image missing": 1, "missing question": 1, "missing answer": 1, "malformed line": 1,
                               "multiple images": 1, "invalid category": 1}
    # the same records as a JSON list: same samples and ids; the broken line is now a string, not an object
    as_list = read_llava(write_json(tmp_path / "eval.json", LLAVA_RECORDS))
    assert as_list.samples == result.samples
    expected = {**reasons(result), "malformed record": 1}
    del expected["malformed line"]
    assert reasons(as_list) == expected


def test_llava_image_root_and_escape(tmp_path):
    touch(tmp_path / "imgs", "x.png")
    touch(tmp_path, "secret.png")
    (tmp_path / "data").mkdir()
    path = write_json(tmp_path / "data" / "eval.json", [
        {"id": "a", "image": "x.png", "conversations": _turns("Q?", "A")},
        {"id": "b", "image": "../secret.png", "conversations": _turns("Q?", "A")},
        {"id": "c", "image": "/etc/hostname", "conversations": _turns("Q?", "A")},
    ])
    result = read_llava(path, image_root=tmp_path / "imgs")
    assert [(s.id, s.image) for s in result.samples] == [("a", tmp_path / "imgs" / "x.png")]
    assert reasons(result) == {"image path escapes root": 2}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic suite


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    summary = synthesize(folder, n=12, seed=3, progress=False)
    return folder, summary


def test_synthetic_reads_the_real_suite(synthetic):
    folder, summary = synthetic
    records = json.loads((folder / "instruct_test.json").read_text())
    result = read_synthetic(folder)
    assert not result.skipped.skipped and len(result) == summary["instruct_test"]["questions"] == len(records) > 0
    assert [(s.id, s.question, s.answers, s.category, s.image, s.meta) for s in result.samples] == [
        (r["id"], r["question"], [r["answer"]], r["category"], folder / r["image"],
         {"pope_split": r["pope_split"]} if r["category"] == "existence" else {}) for r in records]
    assert {s.category for s in result.samples} <= set(CATEGORIES)
    assert result.categories() == {c: n for c, n in summary["instruct_test"]["categories"].items() if n}
    assert all(s.meta["pope_split"] in POPE_SPLITS for s in result.samples if s.category == "existence")
    assert all("<image>" not in s.question for s in result.samples)
    train = read_synthetic(folder, split="train")
    assert len(train) == summary["instruct_train"]["questions"] and not train.skipped.skipped


def test_synthetic_missing_image_is_skipped(synthetic, tmp_path):
    source, _ = synthetic
    records = json.loads((source / "instruct_test.json").read_text())
    folder = tmp_path / "copy"
    touch(folder / "images", *{Path(r["image"]).name for r in records[1:]} - {Path(records[0]["image"]).name})
    write_json(folder / "instruct_test.json", records + [{"id": "extra", "image": records[1]["image"]}])
    result = read_synthetic(folder)
    lost = sum(r["image"] == records[0]["image"] for r in records)
    assert reasons(result) == {"image missing": lost, "missing category": 1}
    assert [s.id for s in result.samples] == [r["id"] for r in records if r["image"] != records[0]["image"]]


# ---------------------------------------------------------------------------------------------------------------
# Errors, registry, limit


@pytest.mark.parametrize("name, kwargs", [
    ("vqav2", {"questions": "nope.json"}),
    ("gqa", {"questions": "nope.json"}),
    ("pope", {"path": "nope.jsonl"}),
    ("mme", {"path": "nope.tsv"}),
    ("coco_captions", {"path": "nope.json"}),
    ("llava", {"path": "nope.json"}),
    ("synthetic", {"folder": "nope"}),
])
def test_missing_files_are_errors_naming_the_file(tmp_path, name, kwargs):
    kwargs = {key: tmp_path / value for key, value in kwargs.items()}
    with pytest.raises(DatasetError, match=r"nope(\.\w+)? does not exist"):
        read(name, **kwargs)


def test_file_level_errors(tmp_path, vqa, synthetic):
    _, images, questions, _ = vqa
    with pytest.raises(DatasetError, match=r"annotations file .*missing.json does not exist"):
        read_vqav2(questions, tmp_path / "missing.json", image_root=images)
    broken = tmp_path / "broken.json"
    broken.write_text('{"questions": [')
    with pytest.raises(DatasetError, match=r"broken.json is not valid JSON"):
        read_vqav2(broken)
    broken.write_text('[{"id": 1},')
    with pytest.raises(DatasetError, match=r"broken.json is not valid JSON"):
        read_llava(broken)
    broken.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DatasetError, match=r"broken.json is not UTF-8"):
        read_llava(broken)
    with pytest.raises(DatasetError, match=r"must hold a JSON list or JSON lines"):
        read_llava(_pretty_printed_object(tmp_path))
    with pytest.raises(DatasetError, match=r"must be a JSON object with a 'questions' list"):
        read_vqav2(write_json(tmp_path / "v2_val2014_questions.json", []))
    with pytest.raises(DatasetError, match=r"image folder .*elsewhere does not exist"):
        read_vqav2(questions, image_root=tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match=r"instruct_valid.json does not exist"):
        read_synthetic(synthetic[0], split="valid")
    with pytest.raises(DatasetError, match=r"is not a file"):
        read_llava(tmp_path)


def _pretty_printed_object(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"id": "a", "conversations": []}, indent=1))
    return path


def test_unknown_reader_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown benchmark reader 'vqa3'; known readers: coco_captions, gqa, llava, "
                                         "mme, pope, synthetic, vqav2"):
        read("vqa3", path="x")
    assert set(READERS) == {"vqav2", "gqa", "pope", "mme", "coco_captions", "llava", "synthetic"}


def test_read_dispatches_and_limit_is_checked(pope):
    images, path = pope
    assert read("pope", path=path, image_root=images) == read_pope(path, image_root=images)
    assert [s.id for s in read_pope(path, image_root=images, limit=1).samples] == ["1"]
    assert read_pope(path, image_root=images, limit=0).samples == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit must be None or a non-negative integer"):
            read_pope(path, image_root=images, limit=bad)


def test_mme_tsv_oversized_field_is_one_bad_row(tmp_path):
    touch(tmp_path, "1.jpg")
    path = tmp_path / "mme.tsv"
    path.write_text("index\timage\tquestion\tanswer\n0\t1.jpg\tQ?\tYes\n"
                    f"1\t{'A' * 200_000}\tQ?\tNo\n"  # over csv's field limit: the parser itself errors on this row
                    "2\t1.jpg\tQ3?\tNo\n")
    result = read_mme(path)
    assert [s.id for s in result.samples] == ["0", "2"]
    assert reasons(result) == {"malformed row": 1}


def test_links_out_of_the_image_folder_are_refused_as_in_training(tmp_path):
    # the rule training applies (links resolved, the target must stay inside the image root), in every reader
    outside = touch(tmp_path / "store", "cat.png")
    images = touch(tmp_path / "imgs", "real.png")
    (images / "inside.png").symlink_to(images / "real.png")  # a link that stays inside is an ordinary image
    (images / "outside.png").symlink_to(outside / "cat.png")
    (images / "sub").symlink_to(outside, target_is_directory=True)
    path = write_json(tmp_path / "eval.json", [
        {"id": name, "image": name, "conversations": _turns("Q?", "A")}
        for name in ("real.png", "inside.png", "outside.png", "sub/cat.png")
    ])
    result = read_llava(path, image_root=images)
    assert [(s.id, s.image) for s in result.samples] == [("real.png", images.resolve() / "real.png"),
                                                         ("inside.png", images.resolve() / "real.png")]
    assert reasons(result) == {"image path escapes root": 2}
    assert "through a symbolic link" in result.skipped.examples[0].detail

    pope = write_lines(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "outside.png", "text": "Is there a cat?", "label": "yes"}])
    assert reasons(read_pope(pope, image_root=images)) == {"image path escapes root": 1}


def test_mme_release_image_linked_out_of_the_folder_is_refused(tmp_path):
    store = touch(tmp_path / "store", "0001.png")
    subtask = touch(tmp_path / "mme" / "OCR", "0002.png")
    (subtask / "0001.png").symlink_to(store / "0001.png")
    (subtask / "0001.txt").write_text("Q1?\tYes\nQ2?\tNo\n")
    (subtask / "0002.txt").write_text("Q1?\tYes\n")
    result = read_mme(tmp_path / "mme")
    assert [s.id for s in result.samples] == ["OCR/0002.png:0"]
    assert reasons(result) == {"image path escapes root": 2}


def test_a_fifo_named_as_an_image_is_skipped(tmp_path):
    images = touch(tmp_path / "imgs", "real.png")
    os.mkfifo(images / "pipe.png")
    path = write_json(tmp_path / "eval.json", [
        {"id": n, "image": n, "conversations": _turns("Q?", "A")} for n in ("real.png", "pipe.png")])
    result = read_llava(path, image_root=images)
    assert [s.id for s in result.samples] == ["real.png"]
    assert reasons(result) == {"image missing": 1}


def test_llava_records_without_a_category_are_grouped_by_answer_type(tmp_path):
    answers = ["Yes", "no.", "3", "Two", "-1.5", "a red ball", "yes, it is"]
    path = write_json(tmp_path / "eval.json", [{"id": str(i), "question": "Q?", "answer": a}
                                                 for i, a in enumerate(answers)])
    assert [s.category for s in read_llava(path).samples] == ["yes/no", "yes/no", "number", "number", "number",
                                                              "other", "other"]
