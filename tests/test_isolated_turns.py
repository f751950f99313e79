"""Isolated turns (a stage's `isolate_turns`): an image's questions merged into one row, each turn seeing the image
and itself only. Exactness: every turn's logits equal its own single sample's (also packed, padded, with V2PE
positions, bidirectional images and a sliding window), the row's loss is the singles' summed loss; the layout falls
back to the plain conversation where it cannot apply; the stage option reaches the samples of a user-layout folder."""

import json
import sys
from pathlib import Path

import pytest
import torch

from monovlm.config import ConfigError, ProcessorConfig
from monovlm.data.collate import collate, collate_packed
from monovlm.data.processor import IGNORE_INDEX, Processor
from monovlm.model.masks import turn_positions
from monovlm.tokenizer import train_bpe_tokenizer
from monovlm.train.data import stage_dataset
from monovlm.train.recipe import StageConfig
from tiny_vlm import build_vlm, conversation, picture, small_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from second_world import generate  # noqa: E402

QUESTIONS = [("what colour is it", "red"), ("how many shapes", "two"), ("is it green", "no")]


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def merged(pairs=QUESTIONS, system: str | None = None) -> dict:
    """The record `group_by_image` makes of one image's single questions: the marker on the first question only."""
    turns = [{"from": "system", "value": system}] if system else []
    for number, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if number == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return {"image": "a.png", "conversations": turns}


def single(question: str, answer: str, system: str | None = None) -> dict:
    record = conversation(question, answer)
    if system:
        record["conversations"].insert(0, {"from": "system", "value": system})
    return record


def turn_view(values: list, turn_ids: list[int], turn: int) -> list:
    """What turn `turn` of an isolated row reads: the shared tokens and its own."""
    return [value for value, owner in zip(values, turn_ids) if owner in (0, turn)]


@pytest.mark.parametrize("template", ["chatml", "auto"])
def test_each_turn_is_its_single_sample(tokenizer, template):
    model, _ = build_vlm(tokenizer)
    processor = Processor(tokenizer, model.config.vision, ProcessorConfig(template=template, system_prompt="Be brief."))
    image = picture(24, 16, 1)
    row = processor.process(merged(), images=[image], isolate_turns=True)
    assert row.turn_ids[0] == 0 and sorted(set(row.turn_ids)) == [0, 1, 2, 3]
    assert row.turn_ids == sorted(row.turn_ids)  # shared tokens, then each turn's in order
    shared = row.turn_ids.count(0)
    assert row.input_ids[shared - 1] == processor.image_end_id  # the prompt head and the image are shared
    for turn, (question, answer) in enumerate(QUESTIONS, 1):
        alone = processor.process(single(question, answer), images=[image])
        assert turn_view(row.input_ids, row.turn_ids, turn) == alone.input_ids
        assert turn_view(row.labels, row.turn_ids, turn) == alone.labels
    assert len(row.images) == 1 and torch.equal(row.images[0], alone.images[0])
    plain = processor.process(merged(), images=[image])
    assert plain.turn_ids is None and plain.input_ids != row.input_ids


def logits_per_turn(model, batch, row: int, start: int, sample) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(batch.input_ids, batch.images, attention_mask=batch.attention_mask, turn_ids=batch.turn_ids)
    ids = batch.turn_ids[row, start:start + len(sample)].tolist()
    return [logits[row, start:start + len(sample)][[i for i, t in enumerate(ids) if t in (0, turn)]]
            for turn in range(1, max(ids) + 1)]


@pytest.mark.parametrize("switches", [{}, {"visual_position_step": 0.5}, {"image_attention": "bidirectional"},
                                      {"sliding_window": 40}], ids=["plain", "v2pe", "bidirectional", "window"])
def test_turn_logits_equal_single_sample_logits_padded_and_packed(tokenizer, switches):
    model, processor = build_vlm(tokenizer, **switches)
    images = [picture(24, 16, 1), picture(16, 32, 2)]
    rows = [processor.process(merged(), images=[images[0]], isolate_turns=True),
            processor.process(merged(QUESTIONS[1:]), images=[images[1]], isolate_turns=True)]
    other = processor.process(conversation("how many shapes", "two", with_image=False))
    singles = [[processor.process(single(q, a), images=[images[0]]) for q, a in QUESTIONS],
               [processor.process(single(q, a), images=[images[1]]) for q, a in QUESTIONS[1:]]]
    padded = collate([rows[0], other, rows[1]], pad_id=0)
    packed = collate_packed([[rows[1], other, rows[0]]], pad_id=0)
    with torch.no_grad():
        alone = [[model(torch.tensor([s.input_ids]), s.images)[0] for s in group] for group in singles]
    for batch, places in ((padded, [(0, 0), (2, 0)]), (packed, [(0, len(rows[1]) + len(other)), (0, 0)])):
        for (row, start), sample, expected in zip(places, rows, alone):
            got = logits_per_turn(model, batch, row, start, sample)
            assert len(got) == len(expected)
            for turn_logits, single_logits in zip(got, expected):
                assert (turn_logits - single_logits).abs().max().item() <= 1e-5
    # the row's summed loss is the singles' summed loss
    with torch.no_grad():
        row_loss = model.loss(padded.input_ids, padded.labels, padded.images, padded.attention_mask,
                              reduction="sum", turn_ids=padded.turn_ids)
        flat = [s for group in singles for s in group] + [other]
        single_batch = collate(flat, pad_id=0)
        singles_loss = model.loss(single_batch.input_ids, single_batch.labels, single_batch.images,
                                  single_batch.attention_mask, reduction="sum")
    assert abs(row_loss.item() - singles_loss.item()) <= 1e-4 * abs(singles_loss.item())
    # and the turns do matter: the same row read as one conversation gives other logits
    with torch.no_grad():
        open_row = model(padded.input_ids, padded.images, attention_mask=padded.attention_mask)[0]
        isolated = model(padded.input_ids, padded.images, attention_mask=padded.attention_mask,
                         turn_ids=padded.turn_ids)[0]
    assert (open_row - isolated).abs().max().item() > 1e-3


def test_positions_restart_after_the_shared_tokens_in_each_document():
    turn_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0, 0, 1, 2, 0]])
    segments = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0]])
    assert turn_positions(positions, turn_ids, segments).tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 2, 0]]


def test_conversations_the_layout_does_not_fit_are_encoded_as_they_are(tokenizer):
    model, processor = build_vlm(tokenizer)
    image = picture(16, 16, 3)
    cases = [merged(QUESTIONS[:1]),  # one question: nothing to isolate
             {"conversations": merged()["conversations"][:3]},  # ends on a question
             # text before the image: the first question's head is not the others'
             {"conversations": [{"from": "human", "value": "what colour is it <image>"}, {"from": "gpt", "value": "red"},
                                {"from": "human", "value": "is it green"}, {"from": "gpt", "value": "no"}]}]
    for record in cases:
        assert processor.process(record, images=[image], isolate_turns=True).turn_ids is None
    after = Processor(tokenizer, model.config.vision.__class__(**{**model.config.vision.__dict__,
                                                                  "image_position": "after_text"}),
                      model.config.processor)
    # the image after each question: the tokens before it differ per question, so nothing is shared
    assert after.process(merged(), images=[image], isolate_turns=True).turn_ids is None
    plain = Processor(tokenizer, model.config.vision, ProcessorConfig(template="plain"))
    assert plain.process(merged(), images=[image], isolate_turns=True).turn_ids is None


def test_the_stage_option_needs_grouping():
    with pytest.raises(ConfigError, match="isolate_turns"):
        StageConfig(name="qa", data="instruct.json", isolate_turns=True)
    with pytest.raises(ConfigError, match="isolate_turns"):
        StageConfig(name="qa", data="instruct.json", group_by_image=True, isolate_turns="yes")
    StageConfig(name="qa", data=["a.json", "b.json"], group_by_image=[False, True], isolate_turns=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    generate(out, images=12, test_images=2, seed=2, progress=False)
    return out, json.loads((out / "instruct.json").read_text())


@pytest.mark.parametrize("yes_no", ["grouped", "open", "weighted"])
def test_a_user_folder_read_with_isolated_turns(world, yes_no):
    root, records = world
    text = [turn["value"] for record in records for turn in record["conversations"]]
    tokenizer = train_bpe_tokenizer(text, vocab_size=300)
    model, _ = build_vlm(tokenizer)
    processor = Processor(tokenizer, model.config.vision, ProcessorConfig(template="chatml", max_length=1024))
    options = dict(name="qa", data="instruct.json", group_by_image=True, yes_no=yes_no)
    isolated = stage_dataset(StageConfig(**options, isolate_turns=True), processor, root)
    grouped = stage_dataset(StageConfig(**options), processor, root)
    assert isolated.records == grouped.records  # the same conversations, laid out otherwise
    assert max(len(record["conversations"]) for record in isolated.records) >= 4
    for index in range(len(isolated)):
        row, conversation_sample = isolated[index], grouped[index]
        turns = len(isolated.records[index]["conversations"]) // 2
        assert (row.turn_ids is None and row.input_ids == conversation_sample.input_ids) if turns == 1 \
            else max(row.turn_ids) == turns  # one question: nothing to isolate
        answers = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]
        assert answers == [t for t, label in zip(conversation_sample.input_ids, conversation_sample.labels)
                           if label != IGNORE_INDEX]  # every reply learnt, in the same order
        if yes_no == "weighted":  # each reply keeps its weight
            assert [w for w, label in zip(row.label_weights, row.labels) if label != IGNORE_INDEX] == \
                [w for w, label in zip(conversation_sample.label_weights, conversation_sample.labels)
                 if label != IGNORE_INDEX]
