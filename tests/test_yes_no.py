"""Yes/no questions as their own samples, balanced per wording (data/yes_no.py), on a user-layout QA folder from the
tests' own second world: the balanced singles leave the wording nothing to predict; the stage option builds them."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.datasets import MixedDataset
from monovlm.data.processor import Processor
from monovlm.data.yes_no import (WordingBalance, Wordings, question_replies, question_wording, wording, wording_prior,
                                 without_yes_no, without_yes_no_turns, yes_no_answer, yes_no_singles,
                                 yes_no_word)
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
    wordings = Wordings.of_singles(singles)
    assert wording_prior(singles) > 0.75  # the world's built-in prior
    balanced = yes_no_singles(records, balanced=True, seed=0)
    per_wording = Counter((wordings(r["conversations"][0]["value"]), yes_no_answer(r)) for r in balanced)
    for key in {w for w, _ in per_wording}:
        if per_wording[(key, "yes")] and per_wording[(key, "no")]:
            assert per_wording[(key, "yes")] == per_wording[(key, "no")], key
    one_sided = sum(n for (key, _), n in per_wording.items()
                    if not (per_wording[(key, "yes")] and per_wording[(key, "no")]))
    assert wording_prior(balanced, wordings) == pytest.approx((len(balanced) - one_sided) / 2 / len(balanced)
                                                              + one_sided / len(balanced))
    assert {id(r) for r in balanced} == {id(r) for r in singles}  # every original once or more, nothing new
    assert balanced == yes_no_singles(records, balanced=True, seed=0)
    rest = without_yes_no(records)
    assert len(rest) + len(singles) == len(records) and all(yes_no_answer(r) is None for r in rest)


def single(question: str, answer: str) -> dict:
    return {"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                 {"from": "gpt", "value": answer}]}


def test_a_frequent_question_is_balanced_on_its_own():
    # one question type, two opposite priors: the first three words ("does the image") would balance them together
    records = ([single("Does the image contain a red star?", "yes")] * 10
               + [single("Does the image contain a red star?", "no")] * 2
               + [single("Does the image contain no red shapes?", "no")] * 10
               + [single("Does the image contain no red shapes?", "yes")] * 2
               + [single("Does the image show a ring?", "yes")] * 3)
    wordings = Wordings.of_singles(records)
    assert wordings("<image>\nDoes the IMAGE contain a red star?") == "does the image contain a red star"
    assert wordings("Does the image show a ring?") == "does the image"  # asked 3 times: its question type's
    three_words = Counter((wording(r), yes_no_answer(r)) for r in records)
    assert three_words[("does the image", "yes")] == 15 and three_words[("does the image", "no")] == 12  # ~balanced
    assert wording_prior(records) == pytest.approx(23 / 27)  # ... yet the whole question answers 23 of 27
    balanced = yes_no_singles(records, balanced=True, seed=0)
    assert len(balanced) == 20 + 20 + 3  # each frequent question 10 and 10; the one-sided rare one as it is
    assert wording_prior(balanced, wordings) == pytest.approx((40 / 2 + 3) / 43)
    balance = WordingBalance(records)
    totals = Counter()
    for record in records:
        totals[(wordings(record["conversations"][0]["value"]), yes_no_answer(record))] += \
            balance.reply_weights(record)[0]
    for question in ("does the image contain a red star", "does the image contain no red shapes"):
        assert totals[(question, "yes")] == pytest.approx(totals[(question, "no")]) == pytest.approx(6.0)


def chatml_processor(records) -> Processor:
    """A chatml processor with a small BPE trained on the records' text."""
    tokenizer = train_bpe_tokenizer([turn["value"] for r in records for turn in r["conversations"]], vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=8, merge=2, max_pixels=64 * 64)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=1024))


def test_the_stage_option_builds_conversations_without_yes_no_and_the_singles(world):
    root, records = world
    processor = chatml_processor(records)
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


def conversation(*pairs):
    turns = []
    for question, reply in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    return {"image": "a.png", "conversations": turns}


def test_wording_balance_gives_each_wordings_yes_and_no_equal_weight():
    records = [conversation(("<image>\nIs there a red star?", "yes"), ("What colour is the ring?", "blue")),
               conversation(("<image>\nIs there a blue ring?", "Yes."), ("Is there no star?", "no")),
               conversation(("<image>\nIs there a green cross?", "yes"), ("Is there no ring?", "yes")),
               conversation(("<image>\nIs there a red ring?", "no"), ("Is there no cross?", "no"))]
    balance = WordingBalance(records)
    # "is there a": 3 yes, 1 no -> 4/6 and 4/2; "is there no": 1 yes, 2 no -> 3/2 and 3/4
    assert balance.reply_weights(records[0]) == [pytest.approx(2 / 3), 1.0]
    assert balance.reply_weights(records[3]) == [pytest.approx(2.0), pytest.approx(0.75)]
    for key in ("is there a", "is there no"):  # the weights cancel the prior: equal totals per answer
        replies = [(w, yes_no_word(reply)) for r in records for (q, reply), w in
                   zip(question_replies(r), balance.reply_weights(r)) if question_wording(q) == key]
        totals = Counter()
        for weight, answer in replies:
            totals[answer] += weight
        assert totals["yes"] == pytest.approx(totals["no"])
    one_sided = WordingBalance([conversation(("Is it red?", "yes")), conversation(("Is it red?", "yes"))])
    assert one_sided.reply_weights(conversation(("Is it red?", "yes"))) == [1.0]
    # token weights: the k-th labelled run (reply + end token) gets the k-th reply's weight
    labels = [-100, -100, 5, 6, -100, -100, 7, 6, -100]
    assert balance.label_weights(labels, records[3], -100) == [1, 1, 2.0, 2.0, 1, 1, 0.75, 0.75, 1]
    assert balance.label_weights([-100, 7, 6], records[3], -100) is None  # one run for two replies ("plain")


def test_open_questions_leave_out_yes_no_pairs_inside_conversations_too():
    records = [conversation(("<image>\nIs there a red star?", "yes"), ("What colour is the ring?", "blue"),
                            ("Is there no star?", "No."), ("How many shapes?", "3")),
               conversation(("<image>\nIs there a blue ring?", "yes")),
               conversation(("What colour is it?\n<image>", "red")),
               {"image": "a.png", "conversations": [{"from": "gpt", "value": "yes"}]}]  # not pairs: kept as it is
    kept = without_yes_no_turns(records)
    assert kept[0]["conversations"] == conversation(("<image>\nWhat colour is the ring?", "blue"),
                                                    ("How many shapes?", "3"))["conversations"]
    assert kept[1:] == records[2:]  # the single yes/no question is gone; an open one is the same object
    assert kept[0]["image"] == "a.png" and records[0]["conversations"][0]["value"].startswith("<image>")  # a copy


def test_open_stage_reads_only_the_questions_the_wording_cannot_answer(world):
    root, records = world
    processor = chatml_processor(records)
    dataset = stage_dataset(StageConfig(name="qa", data="instruct.json", group_by_image=True, yes_no="open"),
                            processor, root)
    replies = [reply for r in dataset.records for _, reply in question_replies(r)]
    expected = [reply for r in records for _, reply in question_replies(r) if yes_no_word(reply) is None]
    assert sorted(replies) == sorted(expected) and len(expected) < len(records)
    assert all(r["conversations"][0]["value"].startswith("<image>") for r in dataset.records)
    assert dataset.name == "instruct.json (open questions)"


def test_weighted_stage_reads_the_conversations_as_they_are_and_weighs_the_loss(world):
    root, records = world
    processor = chatml_processor(records)
    grouped = stage_dataset(StageConfig(name="qa", data="instruct.json", group_by_image=True), processor, root)
    weighted = stage_dataset(StageConfig(name="qa", data="instruct.json", group_by_image=True, yes_no="weighted"),
                             processor, root)
    assert weighted.records == grouped.records  # the same conversations: nothing re-sampled or taken out
    sample = weighted[0]
    assert sample.input_ids == grouped[0].input_ids and sample.labels == grouped[0].labels
    expected = WordingBalance(grouped.records).reply_weights(grouped.records[0])
    runs = []  # the weight of each labelled run, in order
    for index, label in enumerate(sample.labels):
        if label != -100 and (index == 0 or sample.labels[index - 1] == -100):
            runs.append(sample.label_weights[index])
    assert runs == pytest.approx(expected) and any(w != 1.0 for w in expected)
    assert all(w == 1.0 for w, label in zip(sample.label_weights, sample.labels) if label == -100)
    # the batch carries them, padded with 1, and the trainer's loss sums weight × token loss
    from monovlm.data.collate import collate
    from monovlm.train.trainer import _loss_units

    batch = collate([weighted[0], weighted[1]], pad_id=0)
    assert batch.label_weights.shape == batch.labels.shape
    count, token_weights = _loss_units(batch, "token")
    assert count == int((batch.labels[:, 1:] != -100).sum())
    assert torch.equal(token_weights, batch.label_weights[:, 1:])
    _, sample_weights = _loss_units(batch, "sample")
    _, plain_sample_weights = _loss_units(collate([grouped[0], grouped[1]], pad_id=0), "sample")
    assert torch.allclose(sample_weights, plain_sample_weights * batch.label_weights[:, 1:])
    assert collate([grouped[0]], pad_id=0).label_weights is None


def test_the_groups_an_open_stage_is_not_warned_about_are_those_answered_only_yes_or_no():
    from monovlm.eval.qa import yes_no_groups

    def record(answer, category=None):
        turns = [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": answer}]
        return {"conversations": turns, **({"category": category} if category else {})}

    records = [record("yes", "existence"), record("No", "existence"), record("red", "colour"), record("yes", "mixed"),
               record("two", "mixed"), record("yes"), record("no"), record("3")]
    assert yes_no_groups(records) == {"existence", "yes/no"}  # uncategorised records group by answer type
