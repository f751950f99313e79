"""One bad record never stops a run: every record-level fault is a skip that names the record and the reason.

Covers the data readers (`read_records`, `LlavaDataset`), the scratch tokenizer's corpus (which reads the same
records) and `group_by_image`, which must not let a bad record change or lose the good records it is merged with."""

import json
import pickle

import pytest
from PIL import Image

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.datasets import JsonlIndex, LlavaDataset, SkippedSample, merge_turns_by_image, read_records
from monovlm.data.processor import Processor
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.build import build_tokenizer, recipe_texts
from monovlm.train.recipe import recipe_from_dict

HUGE = "9" * 4301  # one digit over Python's default int-string limit: json.loads raises ValueError on it


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_bpe_tokenizer(["a red circle and a blue square, what colour?"] * 10, vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=200))


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "images" / "good.png")
    Image.new("RGB", (12, 20), (0, 0, 255)).save(tmp_path / "images" / "tall.png")
    return tmp_path


def record(image="images/good.png", answer="red", record_id=None, question="<image>\nwhat colour?"):
    entry = {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if record_id is not None:
        entry["id"] = record_id
    return entry


def line(value) -> bytes:
    return json.dumps(value).encode()


def answers_of(sample) -> list[int]:
    return [token for token, label in zip(sample.input_ids, sample.labels) if label != -100]


# ---------------------------------------------------------------------------------------------------------------------
# the reader


def test_jsonl_line_with_a_huge_integer_is_a_named_skip(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\n".join([line(record(record_id="a")), b'{"id": ' + HUGE.encode() + b', "conversations": []}',
                                 line(record(record_id="b"))]) + b"\n")
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"]
    assert [(s.where, s.reason) for s in skipped] == [("train.jsonl line 2", "number too long")]


def test_json_list_skips_only_the_record_with_a_huge_integer(data_dir):
    path = data_dir / "train.json"
    path.write_text('[' + json.dumps(record(record_id="a")) + ', {"id": "big", "n": [1, ' + HUGE + ']}, '
                    + json.dumps(record(record_id="b")) + ']')
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"]
    assert [(s.where, s.reason) for s in skipped] == [("train.json record 1 (id=big)", "number too long")]


def test_invalid_utf8_is_a_skip_not_replacement_characters(data_dir):
    bad = line(record(answer="XX", record_id="bad")).replace(b"XX", b"r\xffd")
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\n".join([line(record(record_id="a")), bad, line(record(record_id="b"))]) + b"\n")
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"]  # no record with U+FFFD in its answer
    assert [(s.where, s.reason) for s in skipped] == [("train.jsonl line 2", "invalid UTF-8")]

    listed = data_dir / "train.json"
    listed.write_bytes(b"[" + b", ".join([line(record(record_id="a")), bad, line(record(record_id="b"))]) + b"]")
    records, skipped = read_records(listed)
    assert [r["id"] for r in records] == ["a", "b"]
    assert [(s.where, s.reason) for s in skipped] == [("train.json record 1 (id=bad)", "invalid UTF-8")]


def test_a_byte_order_mark_and_unicode_line_separators_inside_strings_lose_no_record(data_dir):
    path = data_dir / "train.jsonl"
    raw = json.dumps(record(answer="red\u2028square", record_id="b"), ensure_ascii=False).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line(record(record_id="a")) + b"\n" + raw + b"\n")
    records, skipped = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"] and not skipped
    assert records[1]["conversations"][1]["value"] == "red\u2028square"


def test_lone_surrogate_escape_is_a_skip_before_it_reaches_the_tokenizer(processor, data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\n".join([line(record(record_id="a")), line(record(answer="r\ud800d", record_id="lone")),
                                 line(record(record_id="b"))]) + b"\n")
    dataset = LlavaDataset(path, processor)
    report = dataset.new_report()
    assert len(list(dataset.processed(report))) == 2
    assert report.reasons == {"invalid UTF-8": 1} and "line 2" in report.summary()


def test_too_deeply_nested_line_is_a_skip(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(line(record(record_id="a")) + b"\n" + b"[" * 100_000 + b"\n")
    records, skipped = read_records(path)
    assert len(records) == 1 and [(s.where, s.reason) for s in skipped] == [("train.jsonl line 2", "malformed line")]


def test_a_speaker_that_is_not_a_string_is_a_skip(processor, data_dir):
    bad = {"image": "images/good.png", "conversations": [{"from": ["human"], "value": "<image>\nwhat colour?"},
                                                         {"from": "gpt", "value": "red"}]}
    path = data_dir / "train.json"
    path.write_text(json.dumps([record(), bad]))
    dataset = LlavaDataset(path, processor)
    report = dataset.new_report()
    assert len(list(dataset.processed(report))) == 1
    assert report.skipped == 1 and "unknown speaker" in report.summary()


def test_nul_in_an_image_path_is_a_named_skip(processor, data_dir):
    path = data_dir / "train.json"
    path.write_text(json.dumps([record(), record(image="images/go\x00od.png", record_id="nul")]))
    dataset = LlavaDataset(path, processor)
    report = dataset.new_report()
    assert len(list(dataset.processed(report))) == 1
    assert report.reasons == {"image path invalid": 1}
    assert "id=nul" in report.summary() and "null" in report.summary()


# ---------------------------------------------------------------------------------------------------------------------
# the scratch tokenizer's corpus


def scratch_recipe(data):
    return recipe_from_dict({
        "name": "tiny", "seed": 0,
        "model": {"vocab_size": 300, "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                                 "num_heads": 2, "num_kv_heads": 1},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [{"name": "qa", "data": data, "template": "chatml", "train": ["decoder"], "steps": 1}],
    })


def test_the_tokenizer_corpus_skips_the_records_the_readers_skip_and_says_so(data_dir, capsys):
    path = data_dir / "train.jsonl"
    path.write_bytes(b"\n".join([
        line(record(answer="red square")), b"{not json", b'{"n": ' + HUGE.encode() + b"}",
        line(record(answer="XX")).replace(b"XX", b"\xff\xfe"), line(record(answer="r\ud800")),
        line(record(answer="blue circle"))]) + b"\n")
    recipe = scratch_recipe("train.jsonl")
    texts = list(recipe_texts(recipe, data_dir))
    assert texts == ["\nwhat colour?", "red square", "\nwhat colour?", "blue circle"]
    assert list(recipe_texts(recipe, data_dir, chat_roles=True))[:4] == ["user\n", "\nwhat colour?", "assistant\n",
                                                                          "red square"]
    tokenizer = build_tokenizer(recipe, data_dir)
    assert tokenizer.vocab_size > 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "train.jsonl: 4 (" in out and "1 × number too long" in out


# ---------------------------------------------------------------------------------------------------------------------
# group_by_image


@pytest.mark.parametrize("template", ["chatml", "hf", "plain"])
def test_token_count_is_the_processed_length_without_reading_pixels(processor, data_dir, template):
    from monovlm.data.images import image_header_size, max_image_tokens, num_image_tokens

    processor = Processor(processor.tokenizer, processor.vision, ProcessorConfig(template=template, max_length=200))
    sample = record(image="images/tall.png", answer="a red circle and a blue square")
    sample["conversations"] += [{"from": "human", "value": "and?"}, {"from": "gpt", "value": "a blue square"}]
    processed = processor.process(sample, image_root=data_dir)
    height, width = image_header_size(data_dir / "images" / "tall.png")
    assert (height, width) == (20, 12)
    assert processor.token_count(sample, [num_image_tokens(height, width, processor.vision)]) == len(processed)
    assert num_image_tokens(height, width, processor.vision) <= max_image_tokens(processor.vision)


def test_group_by_image_leaves_short_well_formed_records_as_they_were_merged(processor, data_dir):
    records = [record(answer=answer, record_id=answer) for answer in ("red", "blue", "green")]
    records += [record(image="images/tall.png", answer="tall", record_id="t")]
    path = data_dir / "qa.json"
    path.write_text(json.dumps(records))
    assert LlavaDataset(path, processor, group_by_image=True, group_seed=3).records == \
        merge_turns_by_image(records, seed=3)


def test_a_record_with_the_wrong_marker_count_is_skipped_alone_not_merged(processor, data_dir):
    path = data_dir / "qa.json"
    path.write_text(json.dumps([record(answer="red", record_id="a"),
                                record(answer="blue", record_id="two", question="<image>\n<image>\nwhat colour?"),
                                record(answer="<image> green", record_id="in-answer", question="what colour?"),
                                record(answer="small", record_id="c")]))
    dataset = LlavaDataset(path, processor, group_by_image=True)
    report = dataset.new_report()
    samples = list(dataset.processed(report))
    merged = dataset.records[0]["conversations"]
    assert sorted(turn["value"] for turn in merged[1::2]) == ["red", "small"]  # only the good records merged
    assert report.skipped == 1 and "id=two" in report.summary() and "markers" in report.summary()
    assert len(samples) == 2  # the merged conversation, and the record with its image in the answer on its own


def test_an_over_long_record_is_skipped_alone_and_its_group_is_kept(processor, data_dir):
    path = data_dir / "qa.json"
    path.write_text(json.dumps([record(answer="red", record_id="a"), record(answer="long " * 300, record_id="long"),
                                record(answer="blue", record_id="b")]))
    single = LlavaDataset(path, processor)
    dataset = LlavaDataset(path, processor, group_by_image=True)
    report = dataset.new_report()
    samples = list(dataset.processed(report))
    assert report.reasons == {"too long": 1} and "id=long" in report.summary()
    assert len(samples) == 1  # red and blue, merged
    assert len(answers_of(samples[0])) == len(answers_of(single[0])) + len(answers_of(single[2]))


def test_a_group_over_max_length_is_split_into_conversations_that_fit(processor, data_dir):
    answers = [f"{colour} circle and a blue square and a red circle" for colour in ("red", "blue", "green", "grey",
                                                                                        "pink", "teal", "gold", "tan")]
    records = [record(answer=answer, record_id=str(i)) for i, answer in enumerate(answers)]
    path = data_dir / "qa.json"
    path.write_text(json.dumps(records))
    single = LlavaDataset(path, processor)
    assert sum(len(single[i]) for i in range(len(records))) > processor.config.max_length  # one group cannot fit
    dataset = LlavaDataset(path, processor, group_by_image=True)
    report = dataset.new_report()
    samples = list(dataset.processed(report))
    assert report.skipped == 0 and 1 < len(samples) < len(records)
    assert all(len(sample) <= processor.config.max_length for sample in samples)
    learned = sorted(t["value"] for r in dataset.records for t in r["conversations"][1::2])
    assert learned == sorted(answers)  # every answer once
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in dataset.records)
    again = LlavaDataset(path, processor, group_by_image=True)
    assert again.records == dataset.records  # seeded: the same split every time


# ---------------------------------------------------------------------------------------------------------------------
# JSONL read on demand through a byte-offset index: the same records and skips, only offsets in memory


def awkward_jsonl(path):
    """Good records between blank and whitespace-only lines, \\r\\n and \\r breaks, a BOM, and every kind of bad
    line the reader names."""
    lines = [b"\xef\xbb\xbf" + line(record(record_id="first")), b"", b"   ", line(record(record_id="crlf")),
             b"{not json", line(record(record_id="cr")), line([1, 2]), b'{"id": "\xff"}',
             line(record(record_id="huge")).replace(b'"huge"', HUGE.encode()), b"[" * 100_000,
             line(record(answer="r\u2028d", record_id="separator")), line(record(record_id="last"))]
    breaks = [b"\n", b"\n", b"\n", b"\r\n", b"\n", b"\r", b"\n", b"\n", b"\n", b"\n", b"\n", b""]
    path.write_bytes(b"".join(text + end for text, end in zip(lines, breaks)))
    return path


def test_index_gives_the_readers_records_and_skips_in_file_order(data_dir):
    path = awkward_jsonl(data_dir / "train.jsonl")
    records, skipped = read_records(path)
    index = JsonlIndex(path)
    items = [index[i] for i in range(len(index))]
    assert len(index) == len(records) + len(skipped) == 10
    assert [item for item in items if not isinstance(item, SkippedSample)] == records
    assert [(s.where, s.reason) for s in items if isinstance(s, SkippedSample)] == \
        [(s.where, s.reason) for s in skipped]
    assert [s.where for s in skipped][0] == "train.jsonl line 5"  # line numbers as bytes.splitlines counts them
    assert index[-1] == records[-1]
    with pytest.raises(IndexError, match="has 10 records"):
        index[10]
    (data_dir / "empty.jsonl").write_bytes(b"")
    assert len(JsonlIndex(data_dir / "empty.jsonl")) == 0


def test_records_are_read_when_asked_for_not_kept(data_dir):
    path = data_dir / "train.jsonl"
    path.write_bytes(line(record(record_id="aaa")) + b"\n" + line(record(record_id="bbb")) + b"\n")
    index = JsonlIndex(path)
    assert index[0]["id"] == "aaa"
    path.write_bytes(path.read_bytes().replace(b'"aaa"', b'"zzz"'))  # same length: the offsets still hold
    assert index[0]["id"] == "zzz" and index[1]["id"] == "bbb"
    copy = pickle.loads(pickle.dumps(index))  # as a spawned data worker receives it: it opens the file itself
    assert copy[1]["id"] == "bbb"


def test_dataset_on_a_jsonl_file_reads_it_on_demand_and_counts_bad_lines_when_read(processor, data_dir):
    path = awkward_jsonl(data_dir / "train.jsonl")
    records, skipped = read_records(path)
    (data_dir / "train.json").write_text(json.dumps(records))
    lazy, eager = LlavaDataset(path, processor), LlavaDataset(data_dir / "train.json", processor)
    assert isinstance(lazy.records, JsonlIndex) and lazy.malformed == []
    report = lazy.new_report()
    samples = list(lazy.processed(report))
    assert [s.input_ids for s in samples] == [s.input_ids for s in eager.processed()]
    assert report.total == 10 and report.skipped == len(skipped) == 5
    assert lazy.describe(2) == "train.jsonl line 5" and lazy.describe(0) == "train.jsonl record 0 (id=first)"
    lengths = lazy.text_lengths()
    assert len(lengths) == 10 and lengths[2] == 0 and lengths[0] == eager.text_lengths()[0]
    grouped = LlavaDataset(path, processor, group_by_image=True)  # grouping needs every record: read whole
    assert not isinstance(grouped.records, JsonlIndex) and len(grouped.malformed) == 5


def test_a_scratch_tokenizer_for_chatml_learns_the_role_lines_as_whole_tokens(data_dir):
    """The chatml headers are read in every turn; spelt letter by letter they were ~28% of a QA conversation."""
    (data_dir / "train.json").write_text(json.dumps([record(answer=colour) for colour in ["red", "blue"] * 40]))
    tokenizer = build_tokenizer(scratch_recipe("train.json"), data_dir)
    assert len(tokenizer.encode("assistant\n")) <= 2 and len(tokenizer.encode("user\n")) <= 2
    without = train_bpe_tokenizer(recipe_texts(scratch_recipe("train.json"), data_dir), vocab_size=300)
    assert len(without.encode("assistant\n")) > 2  # the data alone does not teach them
