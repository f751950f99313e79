"""Dataset readers skip bad samples, count them, and name them in the summary; good samples all come through."""

import json

import pytest
from PIL import Image

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.collate import collate
from monovlm.data.datasets import DatasetError, LlavaDataset, MixedDataset, merge_turns_by_image, skipping_collate
from monovlm.data.processor import Processor
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_bpe_tokenizer(["a red circle and a blue square"] * 10, vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=200))


def record(image, answer="red", record_id=None):
    entry = {"conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    if record_id is not None:
        entry["id"] = record_id
    return entry


@pytest.fixture
def data_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(images / "good.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "outside.png").write_bytes(b"")
    return tmp_path


def test_jsonl_reader_skips_and_counts_every_kind_of_bad_sample(processor, data_dir):
    lines = [
        json.dumps(record("images/good.png", record_id="ok-1")),
        "{this is not json",
        json.dumps(record("images/missing.png", record_id="gone")),
        json.dumps(record("images/corrupt.png", record_id="broken")),
        json.dumps(record("../outside.png", record_id="escape")),
        json.dumps(record(None, record_id="text-only")),  # no image, no marker problem: the marker is unmatched
        json.dumps(record("images/good.png", answer="long " * 300, record_id="too-long")),
        json.dumps(record("images/good.png", record_id="ok-2")),
        "[1, 2]",
    ]
    path = data_dir / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dataset = LlavaDataset(path, processor)
    report = dataset.new_report()
    good = list(dataset.processed(report))
    assert len(good) == 2  # both good samples, none lost
    assert report.total == 9 and report.skipped == 7
    assert report.reasons["malformed line"] == 2
    assert report.reasons["image unreadable"] == 2
    assert report.reasons["image path escapes root"] == 1
    assert report.reasons["too long"] == 1
    summary = report.summary()
    for name in ("line 2", "id=gone", "id=broken", "id=escape", "id=too-long", "missing.png"):
        assert name in summary


def test_collate_wrapper_counts_skips_in_the_main_process(processor, data_dir):
    path = data_dir / "train.json"
    path.write_text(json.dumps([record("images/good.png"), record("images/missing.png"), record("images/good.png")]))
    dataset = LlavaDataset(path, processor)
    report = dataset.new_report()
    batch = skipping_collate(lambda items: collate(items, pad_id=0), report)([dataset[i] for i in range(3)])
    assert batch.num_samples == 2 and len(batch.images) == 2
    assert report.skipped == 1 and "missing.png" in report.summary()


def test_unreadable_dataset_file_is_a_clear_error(processor, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        LlavaDataset(tmp_path / "nope.json", processor)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        LlavaDataset(tmp_path / "bad.json", processor)


def test_group_by_image_merges_the_questions_of_one_image_into_one_conversation(processor, data_dir):
    records = [record("images/good.png", "red", "a"), record("images/other.png", "blue", "b"),
               record("images/good.png", "small", "c"), record(None, "text", "d"),
               {"image": ["images/good.png"], "conversations": record(None)["conversations"]}]
    merged = merge_turns_by_image(records)
    assert [m.get("id") for m in merged] == ["a", "b", "d", None]  # first-appearance order; lists pass through
    turns = merged[0]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == "<image>\nwhat colour?" and turns[2]["value"] == "what colour?"  # one marker, first
    assert sorted(t["value"] for t in turns[1::2]) == ["red", "small"]
    assert records[0]["conversations"][0]["value"] == "<image>\nwhat colour?"  # the input is not modified
    assert merge_turns_by_image(records) == merged  # seeded: the same order every time

    path = data_dir / "qa.json"
    path.write_text(json.dumps([record("images/good.png", "red"), record("images/good.png", "blue")]))
    single, grouped = LlavaDataset(path, processor), LlavaDataset(path, processor, group_by_image=True)
    assert len(single) == 2 and len(grouped) == 1
    sample = grouped[0]
    answers = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
    # both answers are learned in the one sample, and its image tokens appear once
    assert len(answers) == sum(len([t for t, l in zip(s.input_ids, s.labels) if l != -100])
                               for s in (single[0], single[1]))
    assert sample.input_ids.count(processor.image_id) == single[0].input_ids.count(processor.image_id)


def test_group_by_image_shuffles_turn_order_per_image():
    """Questions listed in a fixed order per image must not stay in that order (the first turn would give away the
    category); the shuffle is seeded per image."""
    records = [record(f"images/{i}.png", answer, f"{i}-{answer}") for i in range(40) for answer in ("first", "second")]
    first_answers = [m["conversations"][1]["value"] for m in merge_turns_by_image(records)]
    assert 8 < first_answers.count("first") < 32
    assert first_answers != [m["conversations"][1]["value"] for m in merge_turns_by_image(records, seed=1)]



def test_mixed_dataset_reads_each_file_its_repeat_times_per_epoch(processor, data_dir):
    """A mixture [qa.jsonl ×2, other.json]: the first file's samples twice, the second's once, each file grouped by
    image on its own (read twice = each conversation twice, never one conversation with doubled turns), skips counted
    from every file, and a seeded epoch of the stream draws each mixture item once."""
    from monovlm.train.data import BatchStream

    qa = data_dir / "qa.jsonl"
    qa.write_text("\n".join([json.dumps(record("images/good.png", "red", "r")), "{broken",
                             json.dumps(record("images/good.png", "blue", "b")),
                             json.dumps(record("images/missing.png", "green", "g"))]) + "\n")
    other = data_dir / "other.json"
    other.write_text(json.dumps([record("images/good.png", answer, answer) for answer in ("one", "two", "three")]))
    grouped = LlavaDataset(qa, processor, group_by_image=True)
    assert len(grouped) == 2  # good.png's two questions in one conversation, missing.png's alone
    single = LlavaDataset(other, processor)
    mixture = MixedDataset([(grouped, 2), (single, 1)])
    assert len(mixture) == 2 * 2 + 3
    assert mixture.name == "qa.jsonl ×2 + other.json"
    reads = [mixture.locate(i) for i in range(len(mixture))]
    assert [(d.name, j) for d, j in reads] == [("qa.jsonl", 0), ("qa.jsonl", 1), ("qa.jsonl", 0), ("qa.jsonl", 1),
                                              ("other.json", 0), ("other.json", 1), ("other.json", 2)]
    assert mixture[2].input_ids == grouped[0].input_ids == mixture[0].input_ids
    assert mixture[6].input_ids == single[2].input_ids
    assert mixture.describe(5) == single.describe(1)
    with pytest.raises(IndexError, match="out of range"):
        mixture.locate(7)
    report = mixture.new_report()
    samples = list(mixture.processed(report))
    assert len(samples) == 5 and report.total == 1 + 7  # the broken line, then every read
    assert report.reasons == {"malformed line": 1, "image unreadable": 2}  # missing.png skipped on both reads
    assert mixture.text_lengths() == grouped.text_lengths() * 2 + single.text_lengths()

    stream = BatchStream(mixture, 7, seed=0, pad_id=0, announce_epochs=False)
    assert sorted(stream.next_indices()) == list(range(7))
    with pytest.raises(ValueError, match="repeat must be a positive integer"):
        MixedDataset([(single, 0)])


def test_length_grouped_stream_covers_each_epoch_once_shards_and_resumes(processor, tmp_path):
    """group_by_length: batches hold samples of similar length; each epoch still draws every index at most once
    (the ragged batch dropped), W ranks with micro-batch B draw exactly one process's B·W, and the position alone
    resumes the stream."""
    from monovlm.train.data import BatchStream

    answers = ["x" * (3 if i % 3 else 90) + str(i) for i in range(70)]  # a third long, the rest short
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([record("images/a.png", answer=a) for a in answers]))
    dataset = LlavaDataset(path, processor)
    lengths = dataset.text_lengths()
    assert lengths[0] > 90 > lengths[1]

    def take(stream, batches):
        return [stream.next_indices() for _ in range(batches)]

    single = BatchStream(dataset, 8, seed=3, pad_id=0, announce_epochs=False, group_by_length=True)
    assert single.batches_per_epoch == 8
    epoch0, epoch1 = take(single, 8), take(single, 8)
    for epoch in (epoch0, epoch1):
        drawn = [i for batch in epoch for i in batch]
        assert len(drawn) == len(set(drawn)) == 64
    assert epoch0 != epoch1  # a new order each epoch
    mixed = sum(len({lengths[i] > 90 for i in batch}) == 2 for batch in epoch0)
    assert mixed <= 1  # sorted within the mega-batch: long and short meet in at most one batch
    unsorted = BatchStream(dataset, 8, seed=3, pad_id=0, announce_epochs=False)
    assert sum(len({lengths[i] > 90 for i in batch}) == 2 for batch in take(unsorted, 8)) > 1

    ranks = [BatchStream(dataset, 4, seed=3, pad_id=0, rank=r, world_size=2, announce_epochs=False,
                         group_by_length=True) for r in range(2)]
    assert [a + b for a, b in zip(take(ranks[0], 10), take(ranks[1], 10))] == epoch0 + epoch1[:2]

    resumed = BatchStream(dataset, 8, seed=3, pad_id=0, announce_epochs=False, group_by_length=True)
    cut = BatchStream(dataset, 8, seed=3, pad_id=0, announce_epochs=False, group_by_length=True)
    take(cut, 11)
    resumed.load_state(cut.state())
    assert take(resumed, 7) == epoch1[3:] + take(BatchStream(dataset, 8, seed=3, pad_id=0, announce_epochs=False,
                                                             group_by_length=True), 18)[16:]
