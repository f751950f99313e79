"""Yes/no questions as their own samples, balanced per wording (data/yes_no.py), on a user-layout QA folder from the
tests' own second world: the balanced singles leave the wording nothing to predict; the stage option builds them."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.datasets import MixedDataset
from monovlm.data.processor import Processor
from monovlm.data.yes_no import wording, wording_prior, without_yes_no, yes_no_answer, yes_no_singles
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.data import stage_dataset
from monovlm.config import ConfigError
from monovlm.train.recipe import StageConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from second_world import generate  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    generate(out, images=60, test_images=2, seed=1, progress=False)
    return out, json.loads((out / "instruct.json").read_text())


def test_yes_no_answer_and_wording():
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nIs there NO red star?"},
                                                  {"from": "gpt", "value": "No."}]}
    assert yes_no_answer(record) == "no" and wording(record) == "is there no"
    assert yes_no_answer({**record, "conversations": record["conversations"] * 2}) is None  # multi-turn: not single
    assert yes_no_answer({**record, "conversations": [record["conversations"][0],
                                                      {"from": "gpt", "value": "no, a red ring"}]}) is None


def test_balanced_singles_leave_the_wording_nothing_to_predict(world):
    _, records = world
    singles = yes_no_singles(records)
    assert wording_prior(singles) > 0.75  # the world's built-in prior
    balanced = yes_no_singles(records, balanced=True, seed=0)
    per_wording = Counter((wording(r), yes_no_answer(r)) for r in balanced)
    for key in {w for w, _ in per_wording}:
        if per_wording[(key, "yes")] and per_wording[(key, "no")]:
            assert per_wording[(key, "yes")] == per_wording[(key, "no")], key
    one_sided = sum(n for (key, _), n in per_wording.items()
                    if not (per_wording[(key, "yes")] and per_wording[(key, "no")]))
    assert wording_prior(balanced) == pytest.approx((len(balanced) - one_sided) / 2 / len(balanced)
                                                    + one_sided / len(balanced))
    assert {id(r) for r in balanced} == {id(r) for r in singles}  # every original once or more, nothing new
    assert balanced == yes_no_singles(records, balanced=True, seed=0)
    rest = without_yes_no(records)
    assert len(rest) + len(singles) == len(records) and all(yes_no_answer(r) is None for r in rest)


def test_the_stage_option_builds_conversations_without_yes_no_and_the_singles(world):
    root, records = world
    tokenizer = train_bpe_tokenizer([turn["value"] for r in records for turn in r["conversations"]], vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=8, merge=2, max_pixels=64 * 64)
    processor = Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=1024))
    stage = StageConfig(name="qa", data="instruct.json", group_by_image=True, yes_no="balanced")
    dataset = stage_dataset(stage, processor, root, seed=0)
    assert isinstance(dataset, MixedDataset)
    assert dataset.name == "instruct.json (without yes/no) + instruct.json (yes/no, balanced)"
    grouped, singles = (part for part, _ in dataset.parts)
    assert len(grouped) <= 60 and all("conversations" in r for r in grouped.records)  # one per image (or split)
    assert not any(yes_no_answer({"image": "x", "conversations": r["conversations"][i:i + 2]})
                   for r in grouped.records for i in range(0, len(r["conversations"]), 2))
    assert singles.records == yes_no_singles(records, balanced=True, seed=0)
    with pytest.raises(ConfigError, match="yes_no="):
        StageConfig(name="qa", data="instruct.json", yes_no="sometimes")
