"""Batches read in DataLoader worker processes are exactly the in-process batches: same samples, same skip counts,
same resume position, same training losses."""

import json

import pytest
import torch
from PIL import Image

from monovlm.config import ConfigError, ProcessorConfig, VisionConfig
from monovlm.data.datasets import LlavaDataset, MixedDataset
from monovlm.data.processor import Processor
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.data import BatchStream, auto_workers
from monovlm.train.recipe import describe_recipe, load_recipe, recipe_from_dict

WORDS = ["red", "blue", "green", "circle", "square", "what", "colour", "shape", "is", "the", "a", "big", "small"]


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 10, vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=120))


def record(image: str, answer: str, record_id: str) -> dict:
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape?"}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """30 records over 6 images of several sizes; 3 read a missing or a corrupt image, one is too long, and the file
    has one malformed record: every kind of skip the stream must count."""
    root = tmp_path_factory.mktemp("loader_data")
    (root / "images").mkdir()
    for i in range(6):
        Image.new("RGB", (12 + 4 * i, 28 - 2 * i), (40 * i, 255 - 30 * i, 7 * i)).save(root / "images" / f"{i}.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    records: list = []
    for i in range(30):
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))  # lengths vary, for grouping
        records.append(record(f"images/{i % 6}.png", answer, f"r{i}"))
    records[4]["image"] = "images/missing.png"
    records[11]["image"] = "images/broken.png"
    records[23]["image"] = "images/missing.png"
    records[17]["conversations"][1]["value"] = "red " * 200  # over max_length
    records.insert(9, ["not", "a", "record"])
    (root / "train.json").write_text(json.dumps(records))
    (root / "extra.json").write_text(json.dumps([record(f"images/{i % 6}.png", WORDS[i], f"e{i}") for i in range(8)]))
    return root


def stream_of(dataset, workers: int, **settings) -> BatchStream:
    values = dict(batch_size=4, seed=1, pad_id=0, announce_epochs=False, num_workers=workers, prefetch=2)
    values.update(settings)
    return BatchStream(dataset, **values)


def take(stream: BatchStream, count: int) -> list:
    return [stream.next_batch() for _ in range(count)]


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), index
        if a is None:
            continue
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (index, name)
        assert len(a.images) == len(b.images) and all(map(torch.equal, a.images, b.images)), index
        assert (a.num_samples, a.image_keys) == (b.num_samples, b.image_keys), index


def assert_same_report(a: BatchStream, b: BatchStream) -> None:
    assert (a.report.total, a.report.reasons) == (b.report.total, b.report.reasons)
    assert a.report.examples == b.report.examples  # the same skips, named in the same reading order


@pytest.mark.parametrize("kind", ["plain", "group_by_length", "pack", "mixture"])
def test_workers_give_the_in_process_batches_and_skip_counts(processor, data_dir, kind, capsys):
    """Over two and a half epochs (7 batches each): every tensor of every batch and the skip report, with a skip of
    each kind read, and one epoch line per new epoch."""
    dataset = LlavaDataset(data_dir / "train.json", processor)
    settings = {"announce_epochs": True}
    if kind == "group_by_length":
        settings["group_by_length"] = True
    elif kind == "pack":
        settings.update(packed=True, max_length=120)
    elif kind == "mixture":
        dataset = MixedDataset([(dataset, 1), (LlavaDataset(data_dir / "extra.json", processor), 2)])
    count = 2 * len(dataset) // 4 + 3
    in_process = stream_of(dataset, 0, **settings)
    want = take(in_process, count)
    lines_in_process = capsys.readouterr().out
    workers = stream_of(dataset, 2, **settings)
    got = take(workers, count)
    workers.close()
    assert_same_batches(got, want)
    assert_same_report(workers, in_process)
    assert set(in_process.report.reasons) == {"malformed record", "image unreadable", "too long"}
    assert workers.state() == in_process.state()
    assert capsys.readouterr().out == lines_in_process
    assert lines_in_process.count("data: epoch") == 2


def test_resume_with_batches_prefetched_ahead_continues_the_uninterrupted_stream(processor, data_dir):
    """The position counts batches consumed, not the ones the workers read ahead: a stream stopped after k batches,
    saved and loaded into a new one, continues exactly as the uninterrupted stream; so does a stream loaded back to an
    earlier position (its prefetched batches dropped)."""
    dataset = LlavaDataset(data_dir / "train.json", processor)
    full = take(stream_of(dataset, 0), 16)
    cut = stream_of(dataset, 2, prefetch=3)
    first = take(cut, 5)
    state = cut.state()
    assert state == {"epoch": 0, "batch": 5}  # 6 more were prefetched by now, none counted
    later = take(cut, 4)
    cut.load_state(state)  # back: the loader restarts at batch 5
    again = take(cut, 11)
    cut.close()
    resumed = stream_of(dataset, 2, prefetch=3)
    resumed.load_state(state)
    rest = take(resumed, 11)
    resumed.close()
    assert_same_batches(first + later, full[:9])
    assert_same_batches(again, full[5:])
    assert_same_batches(rest, full[5:])


def test_recipe_data_keys_num_workers_and_prefetch(tmp_path):
    recipe = load_recipe("eve", ["data.num_workers=2", "data.prefetch=3"])
    assert (recipe.data.num_workers, recipe.data.prefetch) == (2, 3)
    assert load_recipe("eve").data.num_workers == "auto"
    shown = describe_recipe(recipe)
    assert "data.num_workers = 2" in shown and "data.prefetch = 3" in shown
    stage = {"name": "s", "data": "train.json"}
    for values, key in [({"num_workers": -1}, "num_workers"), ({"num_workers": "many"}, "num_workers"),
                        ({"num_workers": True}, "num_workers"), ({"prefetch": 0}, "prefetch")]:
        with pytest.raises(ConfigError, match=key):
            recipe_from_dict({"name": "r", "data": values, "stages": [stage]})
    with pytest.raises(ConfigError, match="data.prefetch"):
        load_recipe("eve", ["data.prefetch=1.5"])


def test_auto_workers_leave_a_two_core_machine_to_the_model():
    assert auto_workers(cores=2, ranks_per_machine=1) == 0
    assert auto_workers(cores=3, ranks_per_machine=1) == 2
    assert auto_workers(cores=16, ranks_per_machine=1) == 4
    assert auto_workers(cores=16, ranks_per_machine=8) == 0  # 2 cores per rank
    assert auto_workers(cores=32, ranks_per_machine=8) == 3


def test_training_with_workers_gives_the_in_process_losses(tmp_path):
    """A short run reading with 2 workers logs the losses of the same run reading in process, and a run stopped and
    resumed with workers continues them."""
    from monovlm.data.synthetic import synthesize
    from monovlm.train.trainer import TrainOptions, train

    data_root = tmp_path / "synth"
    synthesize(data_root, n=16, seed=0, image_size=32, progress=False)

    def run(workers: int, run_dir, **options) -> list[float]:
        recipe = recipe_from_dict({
            "name": "tiny", "seed": 0, "data": {"num_workers": workers, "prefetch": 2},
            "model": {"vocab_size": 300,
                      "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                                  "num_kv_heads": 1, "tie_word_embeddings": True},
                      "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                                 "max_pixels": 32 * 32}},
            "stages": [{"name": "qa", "data": "instruct.json", "template": "chatml", "batch_size": 4,
                        "grad_accum": 2, "steps": 4, "save_every": 2, "warmup_steps": 1, "max_length": 200,
                        "lr": 3e-3, "eval_every": 0}],
        })
        train(TrainOptions(recipe=recipe, data_root=data_root, run_dir=run_dir, progress=False, measure_peak=False,
                           eval_limit=2, dtype="float32", **options))
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if "loss" in line and "step" in line]

    in_process = run(0, tmp_path / "in_process")
    assert len(in_process) == 4
    assert run(2, tmp_path / "workers") == in_process
    assert run(2, tmp_path / "cut", stop_after=3) == in_process[:3]
    assert run(2, tmp_path / "cut", resume=True) == in_process  # steps 3-4 recomputed from the step-2 checkpoint
