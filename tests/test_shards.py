"""WebDataset shard folders: `monovlm data shard` writes standard tars holding every record and image byte as the
source file has them, and a shard folder trains to the losses of the file it came from."""

import io
import json
import pickle
import shutil
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from monovlm.cli import main
from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.datasets import DatasetError, LlavaDataset, SkippedSample
from monovlm.data.image_files import data_images, load_pixels
from monovlm.data.processor import Processor
from monovlm.data.shards import ShardDataset, read_data_records, write_shards
from monovlm.data.yes_no import without_yes_no
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.data import stage_dataset
from monovlm.train.recipe import StageConfig, recipe_from_dict, resolve_data

WORDS = ["red", "blue", "green", "circle", "square", "what", "colour", "shape", "is", "the", "a", "big", "small",
         "yes", "no", "there", "any"]


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 10, vocab_size=300)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=4, merge=2, embedder_width=16, max_pixels=32 * 32)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=120))


def record(image, question: str, answer: str, record_id: str) -> dict:
    marker = "<image>\n" * (len(image) if isinstance(image, list) else 1)
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": marker + question}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """clean.json: 24 records over 6 images of several sizes and formats (several questions per image, yes/no ones
    among them), a text-only record, a two-image record, a record too long to train on and one malformed record.
    messy.json: clean.json's records and more whose images are missing, corrupt or outside the folder."""
    root = tmp_path_factory.mktemp("shard_data")
    (root / "images").mkdir()
    for i in range(6):
        image = Image.new("RGB", (12 + 4 * i, 28 - 2 * i), (40 * i, 255 - 30 * i, 7 * i))
        image.save(root / "images" / f"{i}.{'jpg' if i == 5 else 'png'}")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "outside.png").write_bytes((root / "images" / "0.png").read_bytes())
    records: list = []
    for i in range(24):
        image = f"images/{i % 6}.{'jpg' if i % 6 == 5 else 'png'}"
        if i % 4 == 3:
            records.append(record(image, f"is there any {WORDS[i % 3]}?", "yes" if i % 8 == 3 else "no", f"r{i}"))
        else:
            answer = " ".join(WORDS[(i + k) % 13] for k in range(1 + i % 5))
            records.append(record(image, "what colour is the shape?", answer, f"r{i}"))
    records.append({"id": "text", "conversations": [{"from": "human", "value": "what is red?"},
                                                    {"from": "gpt", "value": "a colour"}]})
    records.append(record(["images/1.png", "images/5.jpg"], "what shape?", "a circle", "two"))
    records.append(record("images/2.png", "what?", "red " * 200, "long"))
    records.insert(9, ["not", "a", "record"])
    (root / "clean.json").write_text(json.dumps(records))
    messy = records + [record("images/missing.png", "what?", "red", "m1"), record("images/broken.png", "what?", "red",
                                                                                   "m2"),
                       record("../outside.png", "what?", "red", "m3"), {"id": "m4", "image": 7, "conversations": []}]
    (root / "messy.json").write_text(json.dumps(messy))
    return root


def tar_samples(folder) -> list[dict[str, bytes]]:
    """Every sample of a shard folder, read with tarfile alone: {extension: bytes} per key, in shard order."""
    index = json.loads((folder / "shards.json").read_text())
    samples: list[dict[str, bytes]] = []
    for entry in index["shardlist"]:
        with tarfile.open(folder / entry["url"]) as tar:
            keys: list[str] = []
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                    samples.append({})
                samples[-1][extension] = tar.extractfile(member).read()
            assert len(keys) == entry["nsamples"]
    return samples


def test_data_shard_round_trip_keeps_every_record_and_image_byte(data_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "shard", str(data_dir / "messy.json"), "--out", str(out), "--samples-per-shard", "7",
                 "--no-progress"]) == 0
    line = capsys.readouterr().out
    kept = [r for r in json.loads((data_dir / "messy.json").read_text())
            if isinstance(r, dict) and r["id"] not in ("m1", "m2", "m3", "m4")]
    assert f"wrote {len(kept)} samples in 4 shard(s)" in line and "skipped 5" in line
    index = json.loads((out / "shards.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [e["nsamples"] for e in index["shardlist"]] == [7, 7, 7, len(kept) - 21]
    assert all(e["filesize"] == (out / e["url"]).stat().st_size for e in index["shardlist"])
    assert Counter(reason for _, reason, _ in index["monovlm"]["skipped"]) == {
        "malformed record": 1, "image unreadable": 2, "image path escapes root": 1, "malformed image entry": 1}
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000%d.tar" % i for i in range(4)] + ["shards.json"]
    samples = tar_samples(out)
    assert [json.loads(s["json"]) for s in samples] == kept
    for sample, source in zip(samples, kept):
        image = source.get("image")
        names = [] if image is None else [image] if isinstance(image, str) else image
        want = {f"{n}.{name.rsplit('.', 1)[1]}" if isinstance(image, list) else name.rsplit(".", 1)[1]:
                (data_dir / name).read_bytes() for n, name in enumerate(names)}
        assert {k: v for k, v in sample.items() if k != "json"} == want
    records, skipped = read_data_records(out)
    assert records == kept and len(skipped) == 5
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_shards(data_dir / "clean.json", out, progress=False)


def test_webdataset_reads_the_shards(data_dir, tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "shards"
    write_shards(data_dir / "clean.json", out, samples_per_shard=10, progress=False)
    urls = [str(out / e["url"]) for e in json.loads((out / "shards.json").read_text())["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    records = [r for r in json.loads((data_dir / "clean.json").read_text()) if isinstance(r, dict)]
    assert [s["json"] for s in samples] == records
    assert samples[0]["png"].size == Image.open(data_dir / records[0]["image"]).size
    assert set(samples[-2]) >= {"0.png", "1.jpg"}  # the two-image record


def test_data_shard_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shard", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--samples-per-shard" in text and "--image-root" in text and "shards.json" in text


def assert_same_items(got, want) -> None:
    assert len(got) == len(want)
    for index in range(len(want)):
        a, b = got[index], want[index]
        assert type(a) is type(b), index
        if isinstance(b, SkippedSample):
            assert a.reason == b.reason, index
            continue
        assert (a.input_ids, a.labels, a.image_keys, a.label_weights) == (b.input_ids, b.labels, b.image_keys,
                                                                          b.label_weights), index
        assert len(a.images) == len(b.images) and all(map(torch.equal, a.images, b.images)), index


@pytest.mark.parametrize("mode", ["plain", "group_by_image", "select"])
def test_shard_items_are_the_files_processed_samples(processor, data_dir, tmp_path, mode):
    """Item i of the folder is item i of the file, read as it is, grouped by image (the merge's length checks read
    the image headers from the tars) or selected; so is each item of a copy pickled for a spawned worker."""
    out = tmp_path / "shards"
    write_shards(data_dir / "clean.json", out, samples_per_shard=5, progress=False)
    options = {"plain": {}, "group_by_image": {"group_by_image": True, "group_seed": 3},
               "select": {"select": without_yes_no}}[mode]
    shards = ShardDataset(out, processor, **options)
    source = LlavaDataset(data_dir / "clean.json", processor, **options)
    assert_same_items(shards, source)
    assert_same_items(pickle.loads(pickle.dumps(shards)), source)
    assert shards.text_lengths() == source.text_lengths()
    report, want = shards.new_report(), source.new_report()
    assert (report.total, report.reasons) == (want.total, want.reasons)  # the malformed record, counted up front
    assert "too long" in {item.reason for item in (shards[i] for i in range(len(shards)))
                          if isinstance(item, SkippedSample)}


@pytest.mark.parametrize("yes_no", ["weighted", "balanced"])
def test_a_stage_reads_a_shard_folder_as_its_file(processor, data_dir, yes_no):
    """A stage's yes/no handling (the replies' loss weights, the singles read apart and balanced) gives the folder's
    items exactly as the file's."""
    write_shards(data_dir / "clean.json", data_dir / f"stage_{yes_no}", samples_per_shard=8, progress=False)
    settings = dict(name="qa", group_by_image=True, yes_no=yes_no)
    from_file = stage_dataset(StageConfig(data="clean.json", **settings), processor, data_dir, seed=1)
    from_shards = stage_dataset(StageConfig(data=f"stage_{yes_no}", **settings), processor, data_dir, seed=1)
    assert_same_items(from_shards, from_file)
    assert from_shards.name.startswith(f"stage_{yes_no}")


def test_teachers_read_the_images_of_a_shard_folder(processor, data_dir, tmp_path):
    write_shards(data_dir / "clean.json", data_dir / "teacher_shards", samples_per_shard=4, progress=False)
    from_file, from_shards = data_images(data_dir, ["clean.json"]), data_images(data_dir, ["teacher_shards"])
    assert [image.key for image in from_shards] == [image.key for image in from_file]
    vision = processor.vision
    for a, b in zip(from_shards, from_file):
        assert torch.equal(load_pixels(a, vision), load_pixels(b, vision)), a.key
    # a folder and a file naming the same images: one image per key, not a conflict
    assert len(data_images(data_dir, ["teacher_shards", "clean.json"])) == len(from_file)


def tiny_recipe(data, tokenizer, workers: int = 0, group=None):
    stage = {"name": "qa", "data": data, "template": "chatml", "batch_size": 4, "grad_accum": 2, "steps": 4,
             "warmup_steps": 1, "max_length": 200, "lr": 3e-3, "eval_every": 0}
    if group is not None:
        stage["group_by_image"] = group
    return recipe_from_dict({
        "name": "tiny", "seed": 0, "data": {"num_workers": workers, "prefetch": 2},
        "model": {"tokenizer": str(tokenizer),
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [stage],
    })


def test_a_shard_folder_trains_to_the_files_losses(tmp_path):
    """The quickstart's data, its QA file read as a shard folder (grouped by image, in a mixture, as the
    eve-synthetic recipe reads it): the same losses as from the file, read in process and with 2 workers; and the
    mixture's other file as a lazily indexed JSONL: the same losses too."""
    from monovlm.data.synthetic import synthesize
    from monovlm.train.build import recipe_texts
    from monovlm.train.trainer import TrainOptions, train

    data_root = tmp_path / "synth"
    synthesize(data_root, n=16, seed=0, image_size=32, progress=False)
    assert write_shards(data_root / "instruct.json", data_root / "instruct_shards", samples_per_shard=16,
                        progress=False).shards > 1
    tokenizer = train_bpe_tokenizer(recipe_texts(tiny_recipe("instruct.json", "none"), data_root),
                                    vocab_size=300)
    tokenizer.save(tmp_path / "tokenizer")

    def losses(data, workers: int, name: str) -> list[float]:
        recipe = resolve_data(tiny_recipe(data, tmp_path / "tokenizer", workers, group=[True, False]), data_root)
        run_dir = tmp_path / name
        train(TrainOptions(recipe=recipe, data_root=data_root, run_dir=run_dir, progress=False, measure_peak=False,
                           eval_data=None, dtype="float32"))
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if "loss" in line and "step" in line]

    from_file = losses(["instruct.json", "existence_train.json"], 0, "file")
    assert len(from_file) == 4
    assert losses(["instruct_shards", "existence_train.json"], 0, "shards") == from_file
    assert losses(["instruct_shards", "existence_train.json"], 2, "shards_workers") == from_file
    # the same records as JSONL, read as they are: through the byte-offset index (JsonlIndex), not held in memory
    records = json.loads((data_root / "existence_train.json").read_text())
    (data_root / "existence_train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert losses(["instruct.json", "existence_train.jsonl"], 0, "jsonl") == from_file


def test_unfinished_or_damaged_shard_folders_are_named(processor, data_dir, tmp_path):
    out = tmp_path / "shards"
    write_shards(data_dir / "clean.json", out, samples_per_shard=10, progress=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "shards.json").unlink()
    with pytest.raises(DatasetError, match="has no shards.json"):
        ShardDataset(unfinished, processor)
    with pytest.raises(DatasetError, match="has no shards.json"):
        data_images(tmp_path, ["unfinished"])
    recipe = tiny_recipe("unfinished", "none")
    with pytest.raises(FileNotFoundError, match="unfinished is a folder without shards.json"):
        resolve_data(recipe, tmp_path)
    resolve_data(tiny_recipe("shards", "none"), tmp_path)  # a finished folder passes the check
    size = (out / "shard-000001.tar").stat().st_size
    for cut in (size // 2, 700, 100):  # inside a member's bytes, inside a header, before the first header ends
        damaged = tmp_path / f"cut{cut}"
        shutil.copytree(out, damaged)
        with open(damaged / "shard-000001.tar", "r+b") as file:
            file.truncate(cut)
        with pytest.raises(DatasetError, match="shard-000001.tar"):
            ShardDataset(damaged, processor)


def test_a_bad_member_is_a_counted_skip(processor, tmp_path):
    """A hand-written shard whose JSON member is not JSON, or whose image member is missing or corrupt: each such
    sample is a skip naming the sample and the reason, not a stopped run."""
    folder = tmp_path / "hand"
    folder.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good, format="PNG")
    members = [("0.json", b"{not json"),
               ("1.json", json.dumps(record("a.png", "what colour?", "red", "x")).encode()),
               ("2.json", json.dumps(record("b.png", "what colour?", "red", "y")).encode()), ("2.png", b"\x89PNG bad"),
               ("3.json", json.dumps(record("c.png", "what colour?", "red", "z")).encode()), ("3.png", good.getvalue())]
    with tarfile.open(folder / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "shards.json").write_text(json.dumps({"shardlist": [{"url": "s.tar", "nsamples": 4}]}))
    dataset = ShardDataset(folder, processor)
    items = [dataset[i] for i in range(4)]
    assert [getattr(item, "reason", None) for item in items] == ["malformed record", "image unreadable",
                                                                 "image unreadable", None]
    assert "'a.png'" in items[1].detail and "not in the shard folder" in items[1].detail
    assert "s.tar sample 2" in items[2].where and items[3].image_keys == ["c.png"]
