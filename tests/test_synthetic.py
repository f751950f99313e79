"""Synthetic data: determinism, split hygiene, balance, answers and dense labels that agree with the pixels."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from monovlm.data import synthetic as syn

N = 60


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _load(root: Path, name: str):
    return json.loads((root / name).read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_seed0")
    syn.synthesize(root, n=N, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def records(data):
    return {r["id"]: r for r in _load(data, "scenes.json")}


@pytest.fixture(scope="module")
def questions(data):
    return _load(data, "instruct.json") + _load(data, "instruct_test.json")


def test_same_seed_gives_identical_bytes(data, tmp_path):
    syn.synthesize(tmp_path, n=N, seed=0, progress=False)
    first, second = _hashes(data), _hashes(tmp_path)
    assert len(first) == N + 8  # images + captions, instruct, instruct_test, the 3 drill files, scenes, summary
    assert first == second


def test_different_seed_differs(data, tmp_path):
    syn.synthesize(tmp_path, n=N, seed=1, progress=False)
    first, second = _hashes(data), _hashes(tmp_path)
    assert first.keys() == second.keys()
    images_differ = sum(first[k] != second[k] for k in first if k.startswith("images/"))
    assert images_differ > N * 0.9
    assert first["instruct.json"] != second["instruct.json"]


def test_prefix_does_not_depend_on_n(data, tmp_path):
    syn.synthesize(tmp_path, n=N // 2, seed=0, progress=False)
    short = _hashes(tmp_path)
    full = _hashes(data)
    for key in short:
        if key.startswith("images/"):
            assert short[key] == full[key], key
    assert _load(tmp_path, "captions.json") == _load(data, "captions.json")[: len(_load(tmp_path, "captions.json"))]


def test_train_and_test_images_are_disjoint(data, records):
    train = {e["image"] for name in ("captions.json", "instruct.json") for e in _load(data, name)}
    test = {e["image"] for e in _load(data, "instruct_test.json")}
    assert train and test
    assert not train & test
    split_of = {r["image"]: r["split"] for r in records.values()}
    assert all(split_of[i] == "train" for i in train) and all(split_of[i] == "test" for i in test)
    assert abs(sum(r["split"] == "test" for r in records.values()) - 0.2 * N) <= 3


def test_llava_schema_and_summary(data, questions):
    for entry in _load(data, "captions.json"):
        assert set(entry) == {"id", "image", "conversations"}
        assert entry["conversations"][0] == {"from": "human", "value": "<image>"}
        assert entry["conversations"][1]["from"] == "gpt" and entry["conversations"][1]["value"].endswith(".")
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids))
    for q in questions:
        assert q["category"] in syn.CATEGORIES
        assert q["conversations"] == [
            {"from": "human", "value": "<image>\n" + q["question"]},
            {"from": "gpt", "value": q["answer"]},
        ]
        assert ("pope_split" in q) == (q["category"] == "existence")
        assert q["answer"] == q["answer"].lower() and 1 <= len(q["answer"].split()) <= 2
    summary = _load(data, "summary.json")
    for split in ("train", "test"):
        entries = _load(data, syn.qa_file(split))
        counts = summary[f"instruct_{split}"]["categories"]
        assert counts == {c: sum(e["category"] == c for e in entries) for c in syn.CATEGORIES}


def test_every_category_appears(data):
    categories = {q["category"] for q in _load(data, "instruct.json")}
    assert categories == set(syn.CATEGORIES)


def test_yes_no_balanced_and_all_pope_splits(questions):
    existence = [q for q in questions if q["category"] == "existence"]
    assert {q["pope_split"] for q in existence} == set(syn.POPE_SPLITS)
    for split in syn.POPE_SPLITS:
        answers = [q["answer"] for q in existence if q["pope_split"] == split]
        assert answers.count("yes") == answers.count("no") > 0
    mazes = [q["answer"] for q in questions if q["category"] == "maze"]
    assert abs(mazes.count("yes") - mazes.count("no")) <= 2 and mazes.count("yes") > 0


def _shapes_matching(shapes: list[dict], phrase: str) -> list[dict]:
    words = phrase.split()
    *modifiers, noun = words
    wanted = {}
    for w in modifiers:
        wanted["size" if w in syn.SIZES else "color"] = w
    if noun != "object":
        wanted["kind"] = noun
    return [s for s in shapes if all(s[k] == v for k, v in wanted.items())]


def _the_shape(shapes: list[dict], phrase: str) -> dict:
    matching = _shapes_matching(shapes, phrase)
    assert len(matching) == 1, f"ambiguous or absent: the {phrase!r} in {shapes}"  # only unambiguous questions
    return matching[0]


def test_answers_agree_with_scene_and_pixels(data, records, questions):
    checked = set()
    for q in questions:
        record = records[q["id"].split("_")[0]]
        question, answer = q["question"], q["answer"]
        if q["category"] == "maze":
            continue
        shapes = record["shapes"]
        image = np.asarray(Image.open(data / record["image"]).convert("RGB"))
        if m := re.fullmatch(r"What color is the (.+)\?", question):
            shape = _the_shape(shapes, m[1])
            assert answer == shape["color"] == syn.nearest_color(image[shape["cy"], shape["cx"]])
        elif m := re.fullmatch(r"What (shape|size) is the (.+)\?", question):
            assert answer == _the_shape(shapes, m[2])["kind" if m[1] == "shape" else "size"]
        elif question == "How many shapes are there?":
            assert answer == str(len(shapes))
        elif m := re.fullmatch(r"How many (\w+) (?:shapes )?are there\?", question):
            kind = {v: k for k, v in syn.PLURALS.items()}.get(m[1])
            count = sum(s["kind"] == kind if kind else s["color"] == m[1] for s in shapes)
            assert answer == str(count)
        elif m := re.fullmatch(r"Where is the (.+)\?", question):
            assert answer == _the_shape(shapes, m[1])["position"]
        elif m := re.fullmatch(r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?", question):
            a, b = _the_shape(shapes, m[1]), _the_shape(shapes, m[3])
            truth = {
                "to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
                "above": a["row"] < b["row"], "below": a["row"] > b["row"],
            }[m[2]]
            assert answer == ("yes" if truth else "no")
        elif question == "What word is written in the image?":
            assert answer == record["word"].lower()
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
            present = any(s["color"] == m[1] and s["kind"] == m[2] for s in shapes)
            assert answer == ("yes" if present else "no")
        else:
            raise AssertionError(f"unrecognised question {question!r}")
        checked.add(q["category"])
    assert checked == set(syn.CATEGORIES) - {"maze"}


def test_every_shape_centre_has_its_colour(data, records):
    for record in records.values():
        if record["type"] != "scene":
            continue
        image = np.asarray(Image.open(data / record["image"]).convert("RGB"))
        for s in record["shapes"]:
            assert tuple(image[s["cy"], s["cx"]]) == syn.COLORS[s["color"]]


def test_pixel_labels_match_the_drawn_scene(data):
    records = _load(data, "scenes.json")
    scenes = [r for r in records if r["type"] == "scene"]
    assert any(r["word"] for r in scenes) and any(r["type"] == "maze" for r in records)
    for record in records:
        image = np.asarray(Image.open(data / record["image"]).convert("RGB"))
        colour, kind = syn.pixel_labels(record, image)
        if record["type"] == "maze":
            walls = kind == syn.KIND_CLASSES.index("wall")
            assert 0.2 < walls.mean() < 0.8 and image[walls].mean() < image[~walls].mean()  # walls are the dark part
            continue
        coloured = (image != image[..., :1]).any(-1)  # shape pixels; background and text are grey
        assert np.array_equal(coloured, colour > 0)
        for shape in record["shapes"]:
            assert syn.COLOUR_CLASSES[colour[shape["cy"], shape["cx"]]] == shape["color"]
            assert syn.KIND_CLASSES[kind[shape["cy"], shape["cx"]]] == shape["kind"]
        assert (kind == syn.KIND_CLASSES.index("text")).any() == bool(record["word"])
        assert all(tuple(image[y, x]) == syn.COLORS[syn.COLOUR_CLASSES[colour[y, x]]]
                   for y, x in zip(*np.nonzero(colour)))


def test_images_open_with_configured_size(data, records, tmp_path):
    for record in records.values():
        with Image.open(data / record["image"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    syn.synthesize(tmp_path, n=8, seed=3, image_size=96, progress=False)
    sizes = {Image.open(p).size for p in (tmp_path / "images").glob("*.png")}
    assert sizes == {(96, 96)}


def test_maze_pixel_label_agrees_with_construction():
    for image_size in (32, 64, 96):
        for index in range(40):
            maze = syn.sample_maze(seed=7, index=index, image_size=image_size, loops=index % 2 == 1)
            topology = syn.maze_topology(syn.render_maze(maze), maze.cells)
            assert topology.nodes == maze.cells**2 and topology.components == 1
            assert topology.loops == maze.built_loops
            assert (topology.loops > 0) == (index % 2 == 1)


def test_maze_answers_come_from_pixels(data, records, questions):
    for q in questions:
        if q["category"] != "maze":
            continue
        record = records[q["id"].split("_")[0]]
        topology = syn.maze_topology(Image.open(data / record["image"]), record["cells"])
        assert q["answer"] == ("yes" if topology.loops > 0 else "no") == ("yes" if record["built_loops"] else "no")


def _paint_block(image: Image.Image, cells: int, unit_row: int, unit_col: int, color) -> Image.Image:
    unit, margin = syn.maze_geometry(image.size[0], cells)
    painted = image.copy()
    x0, y0 = margin + unit_col * unit, margin + unit_row * unit
    ImageDraw.Draw(painted).rectangle((x0, y0, x0 + unit - 1, y0 + unit - 1), fill=color)
    return painted


def test_painting_over_a_wall_changes_the_label():
    maze = syn.sample_maze(seed=0, index=3, image_size=64, loops=False)
    image = syn.render_maze(maze)
    assert syn.maze_topology(image, maze.cells).loops == 0
    closed = next(w for w in syn._interior_walls(maze.cells) if w not in maze.passages)
    r1, c1, r2, c2 = closed
    opened = _paint_block(image, maze.cells, r1 + r2 + 1, c1 + c2 + 1, maze.floor)  # erase one wall
    assert syn.maze_topology(opened, maze.cells).loops == 1
    # and back: painting a wall over that passage removes the loop again
    reclosed = _paint_block(opened, maze.cells, r1 + r2 + 1, c1 + c2 + 1, maze.wall)
    assert syn.maze_topology(reclosed, maze.cells).loops == 0


def test_invalid_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        syn.synthesize(tmp_path, n=4, test_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        syn.synthesize(tmp_path, n=4, image_size=16, progress=False)
    for bad in ((4, 3), (1, 3), (3,), 4, (3.0, 4)):
        with pytest.raises(ValueError, match="maze_cells"):
            syn.synthesize(tmp_path, n=4, maze_cells=bad, progress=False)


def test_maze_sizes_follow_maze_cells(tmp_path):
    syn.synthesize(tmp_path, n=40, seed=2, maze_fraction=1.0, maze_cells=(5, 6), progress=False)
    records = json.loads((tmp_path / "scenes.json").read_text())
    assert {r["cells"] for r in records} == {5, 6}
    assert json.loads((tmp_path / "summary.json").read_text())["maze_cells"] == [5, 6]
    default = {syn.sample_maze(seed=2, index=i, image_size=64, loops=False).cells for i in range(40)}
    assert default == set(range(syn.MAZE_CELLS[0], syn.MAZE_CELLS[1] + 1))


def test_data_synth_command_defaults_match_the_library():
    import inspect

    from monovlm.commands import data_synth

    defaults = inspect.signature(data_synth).parameters
    assert (defaults["maze_min_cells"].default, defaults["maze_max_cells"].default) == syn.MAZE_CELLS


def _scene(*objects: str, word: str | None = None) -> syn.Scene:
    shapes = []
    for i, obj in enumerate(objects):
        size, color, kind = obj.split()
        row, col = divmod(i * 8 if len(objects) == 2 else i, 3)  # two shapes: top left and bottom right
        shapes.append(syn.Shape(kind=kind, color=color, size=size, row=row, col=col, cx=0, cy=0, r=1))
    return syn.Scene(64, syn.Background("plain", "white"), tuple(shapes), word, 1 if word else None)


def test_caption_wording_and_order():
    scene = _scene("large red circle", "small blue square")
    assert syn.scene_caption(scene) == "a large red circle at the top left and a small blue square at the bottom right."
    scene = _scene("small orange cross", "large green triangle", "small red circle", word="CAT")
    assert syn.scene_caption(scene) == (
        "a small orange cross at the top left, a large green triangle at the top and a small red circle at the top "
        'right. the word "cat" is written in the middle.'
    )


def test_pope_negative_samplers():
    stats = syn.pope_statistics([
        _scene("large red circle", "large blue square"),
        _scene("large red circle", "large blue square"),
        _scene("large red circle", "large green triangle"),
        _scene("large green triangle", "large purple cross"),
        _scene("large green triangle", "large purple cross"),
    ])
    assert stats.frequency["red circle"] == 3 and stats.co_occurrence["green triangle"]["purple cross"] == 2
    query = _scene("small green triangle")
    rng = np.random.default_rng(0)
    by_split = {s: syn.existence_questions(query, stats, s, rng) for s in syn.POPE_SPLITS}
    for split, qs in by_split.items():
        assert [q["answer"] for q in qs] == ["yes", "no"] and {q["pope_split"] for q in qs} == {split}
        assert qs[0]["question"] == "Is there a green triangle in the image?"
    assert by_split["popular"][1]["question"] == "Is there a red circle in the image?"  # most frequent absent
    assert by_split["adversarial"][1]["question"] == "Is there a purple cross in the image?"  # co-occurs most
    assert by_split["random"][1]["question"] != by_split["random"][0]["question"]
    # name-balanced: the absent object asked present most often more than absent, and the balance is kept
    balance = Counter({"red circle": 2, "blue square": 3, "purple cross": 1})
    qs = syn.existence_questions(query, stats, syn.BALANCED, rng, balance=balance)
    assert [q["question"] for q in qs] == ["Is there a green triangle in the image?",
                                           "Is there a blue square in the image?"]
    assert balance == {"red circle": 2, "blue square": 2, "purple cross": 1, "green triangle": 1}
    with pytest.raises(ValueError, match="balance"):
        syn.existence_questions(query, stats, syn.BALANCED, rng)


def test_balanced_train_negatives_make_the_name_uninformative(tmp_path):
    # POPE's samplers (the default, and always the test split's) make the name predictive; "balanced" must not
    pope, balanced = tmp_path / "pope", tmp_path / "balanced"
    syn.synthesize(pope, n=400, seed=2, image_size=32, maze_fraction=0.0, progress=False)
    summary = syn.synthesize(balanced, n=400, seed=2, image_size=32, maze_fraction=0.0, progress=False,
                             train_negatives="balanced")
    assert summary["train_negatives"] == "balanced" and set(summary["instruct_train"]["pope"]) == {"balanced"}
    assert _load(balanced, "instruct_test.json") == _load(pope, "instruct_test.json")  # the test split is unchanged
    assert _hashes(balanced / "images") == _hashes(pope / "images")

    def name_only_accuracy(folder):  # the best a blind model can do: the majority answer of each question
        answers: dict[str, Counter] = {}
        for q in _load(folder, "instruct.json"):
            if q["category"] == "existence":
                answers.setdefault(q["question"], Counter())[q["answer"]] += 1
        assert len(answers) == len(syn.OBJECTS)
        return sum(max(c.values()) for c in answers.values()) / sum(sum(c.values()) for c in answers.values()), answers

    pope_accuracy, _ = name_only_accuracy(pope)
    balanced_accuracy, answers = name_only_accuracy(balanced)
    assert pope_accuracy > 0.6
    assert all(abs(c["yes"] - c["no"]) <= 1 for c in answers.values()) and balanced_accuracy < 0.52
    # train questions, existence included, of a shorter run are a prefix: the greedy balance looks back only
    syn.synthesize(tmp_path / "short", n=200, seed=2, image_size=32, maze_fraction=0.0, progress=False,
                   train_negatives="balanced")
    short = _load(tmp_path / "short", "instruct.json")
    assert short == _load(balanced, "instruct.json")[: len(short)]
    with pytest.raises(ValueError, match="train_negatives"):
        syn.synthesize(tmp_path / "bad", n=4, train_negatives="random")


def test_existence_drills_are_right_balanced_and_independent(tmp_path):
    """colour_train.json and existence_train.json: train scenes only, every answer true of the scene, every object
    asked present as often as absent (within one), and the colour-and-kind answers drawn per question — not one yes
    and one no per image, which a model could read off the image's other question."""
    summary = syn.synthesize(tmp_path, n=400, seed=4, image_size=32, maze_fraction=0.1, progress=False)
    scenes = {r["image"]: r for r in _load(tmp_path, "scenes.json")}
    train_scenes = {i for i, r in scenes.items() if r["split"] == "train" and r["type"] == "scene"}
    colour, existence = _load(tmp_path, "colour_train.json"), _load(tmp_path, "existence_train.json")
    instruct = _load(tmp_path, "instruct.json")
    assert _load(tmp_path, "instruct_train_no_existence.json") == [q for q in instruct if q["category"] != "existence"]
    assert any(q["category"] == "existence" for q in instruct)
    distinct = {i: len({(s["color"], s["kind"]) for s in scenes[i]["shapes"]}) for i in train_scenes}
    assert summary["drills"]["existence_train"]["questions"] == len(existence) == sum(
        min(syn.EXISTENCE_DRILLS, d) for d in distinct.values())
    assert summary["drills"]["colour_train"]["questions"] == len(colour) >= 2 * len(train_scenes) - 5
    balances = []
    for rows, pattern, attribute in ((colour, r"Is there anything (\w+) in the image\?", "color"),
                                     (existence, r"Is there an? (\w+ \w+) in the image\?", "name")):
        assert {r["image"] for r in rows} == train_scenes
        balance: Counter = Counter()
        for r in rows:
            asked = re.fullmatch(pattern, r["question"]).group(1)
            shapes = scenes[r["image"]]["shapes"]
            present = {s["color"] if attribute == "color" else f"{s['color']} {s['kind']}" for s in shapes}
            assert r["answer"] == ("yes" if asked in present else "no"), r
            assert r["conversations"][0]["value"] == "<image>\n" + r["question"] and r["category"] == "existence"
            balance[asked] += 1 if r["answer"] == "yes" else -1
        balances.append(balance)
    colour_balance, object_balance = balances
    # colours: a yes and a no per scene (so 50:50 overall), and on purpose not name-balanced: the colour word alone
    # answers well over half (a common colour is asked present more often than absent, a rare one absent)
    assert [r["answer"] for r in colour].count("yes") == len(train_scenes)
    colours_asked = Counter(re.fullmatch(r"Is there anything (\w+) in the image\?", r["question"]).group(1)
                            for r in colour)
    colour_prior = sum((colours_asked[c] + abs(b)) / 2 for c, b in colour_balance.items()) / len(colour)
    assert colour_prior > 0.6
    # objects: greedy balance, so the name alone predicts little (a blind model's best: each name's majority answer)
    asked = Counter(re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", r["question"]).group(1) for r in existence)
    name_only = sum((asked[o] + abs(b)) / 2 for o, b in object_balance.items()) / len(existence)
    assert name_only < 0.53
    per_image = Counter()
    for r in existence:
        per_image[r["image"]] += r["answer"] == "yes"
    assert {0, 1, 2} <= set(per_image.values())  # two yes, one of each, two no: all occur
    assert len({(r["image"], r["question"]) for r in existence}) == len(existence)  # never the same object twice
    assert abs(sum(r["answer"] == "yes" for r in existence) / len(existence) - 0.5) < 0.06
