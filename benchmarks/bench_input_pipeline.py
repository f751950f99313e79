"""The training input pipeline alone (read, decode, resize, tokenize, collate), in process vs in DataLoader workers.

Writes N 448×448 JPEGs and a LLaVA JSON (one question and answer per image) into a temporary folder, then, for each
worker count, reads one epoch of micro-batches through the trainer's `BatchStream` and reports samples/s, against
0 workers (the in-process path) measured in the same run. No model runs: this is the most the workers can gain, and
on a machine whose cores the model already keeps busy a real run gains less. Worker start-up is inside the timing.

    python benchmarks/bench_input_pipeline.py                                   # 512 images, 0 / 1 / 2 workers
    python benchmarks/bench_input_pipeline.py --images 64 --workers 0 2         # a quick look
    python benchmarks/bench_input_pipeline.py --workers 0 2 4 8 --batch-size 32 --max-pixels 200704
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from monovlm.config import ProcessorConfig, VisionConfig
from monovlm.data.datasets import LlavaDataset
from monovlm.data.processor import Processor
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer
from monovlm.train.data import BatchStream

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SIDE = 448


def write_data(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of coloured shapes on a noisy background (JPEG decoding cost like a photo's, not a flat
    image's) and a LLaVA JSON asking about each. -> the JSON's path."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        noise = Image.effect_noise((SIDE, SIDE), 40).convert("RGB")
        image = Image.blend(Image.new("RGB", (SIDE, SIDE), tuple(rng.randrange(256) for _ in range(3))), noise, 0.3)
        draw = ImageDraw.Draw(image)
        colour = rng.choice(COLOURS)
        for _ in range(rng.randint(1, 4)):
            x, y, size = rng.randrange(SIDE - 100), rng.randrange(SIDE - 100), rng.randint(30, 100)
            draw.ellipse((x, y, x + size, y + size), fill=colour)
        name = f"images/{index:05d}.jpg"
        image.save(folder / name, quality=90)
        records.append({"id": str(index), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour are the circles in this picture?"},
            {"from": "gpt", "value": f"The circles are {colour}, on a background of noise."}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def make_processor(records: list[dict], max_pixels: int) -> Processor:
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    add_image_special_tokens(tokenizer)
    vision = VisionConfig(embedder="conv", patch_size=14, merge=2, max_pixels=max_pixels)
    return Processor(tokenizer, vision, ProcessorConfig(template="chatml", max_length=4096))


def measure(dataset: LlavaDataset, workers: int, batch_size: int, prefetch: int) -> tuple[int, float]:
    """(samples read, seconds) for one epoch of micro-batches, worker start-up included."""
    started = time.perf_counter()
    stream = BatchStream(dataset, batch_size, seed=0, pad_id=0, announce_epochs=False, num_workers=workers,
                         prefetch=prefetch)
    samples = 0
    for _ in range(stream.batches_per_epoch):
        batch = stream.next_batch()
        samples += batch.num_samples if batch is not None else 0
    stream.close()
    return samples, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="JPEGs to generate (one sample each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per micro-batch")
    parser.add_argument("--prefetch", type=int, default=2, help="micro-batches each worker reads ahead")
    parser.add_argument("--max-pixels", type=int, default=SIDE * SIDE, help="area budget after resizing")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than one micro-batch ({args.batch_size})")
    counts = [0] + [w for w in args.workers if w != 0]  # the ratios are against the in-process path

    with tempfile.TemporaryDirectory(prefix="bench_input_pipeline_") as folder:
        print(f"writing {args.images} {SIDE}x{SIDE} JPEGs ...", file=sys.stderr)
        path = write_data(Path(folder), args.images)
        processor = make_processor(json.loads(path.read_text()), args.max_pixels)
        dataset = LlavaDataset(path, processor)
        measure(dataset, 0, args.batch_size, args.prefetch)  # warm the file cache: every run then reads from memory
        rates = {}
        for workers in counts:
            samples, seconds = measure(dataset, workers, args.batch_size, args.prefetch)
            rates[workers] = samples / seconds
            print(f"{workers} workers: {samples} samples in {seconds:.2f} s", file=sys.stderr)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Input pipeline, {args.images} JPEGs {SIDE}x{SIDE} -> max_pixels {args.max_pixels}, micro-batch "
          f"{args.batch_size}, prefetch {args.prefetch}; {cores} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads in the main process, {platform.processor() or platform.machine()}\n")
    print("| workers | samples/s | vs 0 workers |")
    print("|---:|---:|---:|")
    for workers in counts:
        print(f"| {workers} | {rates[workers]:.1f} | {rates[workers] / rates[0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
