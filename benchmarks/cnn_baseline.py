"""A plain CNN + GRU VQA classifier on any LLaVA-format QA folder with short answers: the bar a VLM should clear.

Reads the training records (`--train`, e.g. DIR/instruct.json) and their images with plain JSON and Pillow, nothing
from monovlm. The question (lowercase word tokens) goes through a small GRU; the image through a small CNN whose
feature map the question modulates (FiLM) before a spatial max-pool, so "is there a red star?" can be answered at any
position; the answer is a class among the training answers. Trains for `--minutes` of wall clock or `--steps`, then
scores exact match on `--test` per record "category" (records without one: "yes/no" or "other" by the answer).

Beside it, on the same batches and steps: a **blind** model (the same question encoder and head, no image), i.e. what
the wording alone gets, and the CNN itself fed a constant grey image ("grey image": how much of its answer it reads
from the picture).

    python benchmarks/cnn_baseline.py --train /tmp/world2/instruct.json --test /tmp/world2/instruct_test.json \
        --minutes 10 --threads 1 --json /tmp/world2_cnn.json

On the second world (`benchmarks/second_world.py --images 4000 --test-images 1000 --seed 0`), that command (2,895
steps, one CPU thread) scored yes/no 95.3, shape 61.8, colour 77.5, overall 88.9% (blind: 82.4 / 20.0 / 19.0 / 66.8;
the CNN fed a grey image: 28.6 / 19.9 / 21.4 / 26.6).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

PAD, UNK = 0, 1


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.replace("<image>", " ").lower())


def read_qa(path: Path) -> list[dict]:
    """(image, question, answer, category) of each single-image QA record; others are counted and left out."""
    text = path.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    out, skipped = [], 0
    for record in records:
        turns = record.get("conversations") or []
        human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
        if not isinstance(record.get("image"), str) or not isinstance(human, str) or not isinstance(answer, str):
            skipped += 1
            continue
        answer = normalise(answer)
        category = record.get("category") or ("yes/no" if answer in ("yes", "no") else "other")
        out.append({"image": record["image"], "question": human, "answer": answer, "category": category})
    if skipped:
        print(f"{path.name}: left out {skipped} records without an image, a question or an answer")
    return out


def load_images(paths: list[str], root: Path, size: int) -> torch.Tensor:
    """All images, resized to size x size, as one uint8 tensor (N, 3, size, size)."""
    pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(root / path) as image:
            pixels[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def encode_questions(questions: list[str], vocab: dict[str, int]) -> torch.Tensor:
    ids = [[vocab.get(w, UNK) for w in tokens(q)] or [UNK] for q in questions]
    out = torch.full((len(ids), max(len(i) for i in ids)), PAD, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq)
    return out  # (N, T), right-padded


class VQANet(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int, use_image: bool = True, width: int = 64):
        super().__init__()
        self.use_image = use_image
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.gru = nn.GRU(width, 2 * width, batch_first=True)
        channels = 2 * width
        if use_image:
            self.cnn = nn.Sequential(  # 64 -> 32 -> 16 -> 8
                nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            )
            self.film = nn.Linear(2 * width, 2 * channels)  # question -> per-channel scale and shift
            self.fused = nn.Conv2d(channels, channels, 1)  # per place: binds e.g. colour and kind of one shape
        self.head = nn.Sequential(nn.Linear(channels + 2 * width, 256), nn.ReLU(), nn.Linear(256, num_answers))

    def question(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != PAD).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.gru(packed)[1][0]  # (B, 2w): the last hidden state

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None, image_index: torch.Tensor | None = None):
        """ids (B, T); images (M, 3, H, W) uint8, question b asks about images[image_index[b]]."""
        q = self.question(ids)  # (B, 2w)
        if not self.use_image:
            return self.head(torch.cat([q.new_zeros(q.shape[0], self.head[0].in_features - q.shape[1]), q], 1))
        features = self.cnn(images.float() / 255.0 - 0.5)  # (M, C, 8, 8): each image once, however many questions
        features = features[image_index] if image_index is not None else features  # (B, C, 8, 8)
        scale, shift = self.film(q).chunk(2, dim=1)  # (B, C) each
        features = F.relu(features * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        pooled = F.relu(self.fused(features)).amax(dim=(2, 3))  # (B, C): anywhere in the image
        return self.head(torch.cat([pooled, q], 1))


def batches(by_image: dict[int, list[int]], images_per_batch: int, generator: torch.Generator):
    """Endless batches: a few images at a time with all their questions (the CNN runs once per image)."""
    keys = list(by_image)
    while True:
        order = torch.randperm(len(keys), generator=generator).tolist()
        for start in range(0, len(order), images_per_batch):
            chosen = [keys[i] for i in order[start: start + images_per_batch]]
            yield chosen, [q for image in chosen for q in by_image[image]]


@torch.no_grad()
def predict(model: VQANet, ids: torch.Tensor, images: torch.Tensor, image_index: torch.Tensor,
            batch: int = 512) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(ids), batch):
        rows = slice(start, start + batch)
        if not model.use_image:
            out.append(model(ids[rows], None).argmax(1))
            continue
        used, local = image_index[rows].unique(return_inverse=True)  # the CNN sees only this batch's images
        out.append(model(ids[rows], images[used], local).argmax(1))
    model.train()
    return torch.cat(out)


def accuracy_by_category(predicted: list[str], test: list[dict]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for answer, qa in zip(predicted, test):
        hits[qa["category"]].append(answer == qa["answer"])
        hits["overall"].append(answer == qa["answer"])
    return {category: 100.0 * sum(h) / len(h) for category, h in hits.items()}


def run(train_path: Path, test_path: Path, minutes: float | None = None, steps: int | None = None,
        size: int = 64, images_per_batch: int = 16, lr: float = 2e-3, seed: int = 0,
        image_root: Path | None = None, log_every: float = 30.0) -> dict:
    torch.manual_seed(seed)
    train, test = read_qa(train_path), read_qa(test_path)
    words = Counter(w for qa in train for w in tokens(qa["question"]))
    vocab = {w: i + 2 for i, w in enumerate(sorted(words))}
    answers = sorted({qa["answer"] for qa in train})
    answer_id = {a: i for i, a in enumerate(answers)}

    def tensors(qas: list[dict], root: Path):
        paths = sorted({qa["image"] for qa in qas})
        slot = {p: i for i, p in enumerate(paths)}
        return (encode_questions([qa["question"] for qa in qas], vocab), load_images(paths, root, size),
                torch.tensor([slot[qa["image"]] for qa in qas]))

    start = time.time()
    train_ids, train_images, train_index = tensors(train, image_root or train_path.parent)
    test_ids, test_images, test_index = tensors(test, image_root or test_path.parent)
    labels = torch.tensor([answer_id[qa["answer"]] for qa in train])
    print(f"loaded {len(train)} train / {len(test)} test questions, {len(train_images)} / {len(test_images)} images,"
          f" {len(vocab)} words, {len(answers)} answers in {time.time() - start:.1f}s")

    by_image: dict[int, list[int]] = defaultdict(list)
    for row, image in enumerate(train_index.tolist()):
        by_image[image].append(row)
    models = {"cnn": VQANet(len(vocab) + 2, len(answers)), "blind": VQANet(len(vocab) + 2, len(answers), False)}
    optimisers = {name: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4) for name, m in models.items()}
    budget = minutes * 60.0 if minutes is not None else None
    if budget is None and steps is None:
        raise ValueError("give --minutes or --steps")
    step, start, last_log = 0, time.time(), time.time()
    for chosen, rows in batches(by_image, images_per_batch, torch.Generator().manual_seed(seed)):
        elapsed = time.time() - start
        progress = max(step / steps if steps else 0.0, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        local = {image: i for i, image in enumerate(chosen)}
        rows_t = torch.tensor(rows)
        index = torch.tensor([local[i] for i in train_index[rows_t].tolist()])
        losses = {}
        for name, model in models.items():
            for group in optimisers[name].param_groups:  # cosine decay over the budget (steps or wall clock)
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
            logits = model(train_ids[rows_t], train_images[chosen], index) if model.use_image else \
                model(train_ids[rows_t], None)
            loss = F.cross_entropy(logits, labels[rows_t])
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
            losses[name] = loss.item()
        step += 1
        if time.time() - last_log > log_every:
            last_log = time.time()
            print(f"step {step} ({elapsed:.0f}s): loss cnn {losses['cnn']:.3f} blind {losses['blind']:.3f}",
                  flush=True)
    seconds = time.time() - start

    grey = torch.full_like(test_images, 128)
    predictions = {
        "cnn": predict(models["cnn"], test_ids, test_images, test_index),
        "cnn, grey image": predict(models["cnn"], test_ids, grey, test_index),
        "blind": predict(models["blind"], test_ids, test_images, test_index),
    }
    accuracy = {name: accuracy_by_category([answers[i] for i in p.tolist()], test) for name, p in predictions.items()}
    counts = Counter(qa["category"] for qa in test)
    counts["overall"] = len(test)
    return {"train": str(train_path), "test": str(test_path), "steps": step, "seconds": round(seconds, 1),
            "train_questions": len(train), "answers": len(answers), "n": dict(counts), "accuracy": accuracy}


def table(result: dict) -> str:
    columns = list(result["accuracy"])
    lines = ["| category | questions | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    categories = sorted(c for c in result["n"] if c != "overall") + ["overall"]
    for category in categories:
        cells = [f"{result['accuracy'][c].get(category, float('nan')):.1f}" for c in columns]
        lines.append(f"| {category} | {result['n'][category]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="LLaVA QA json/jsonl (e.g. DIR/instruct.json)")
    parser.add_argument("--test", type=Path, required=True, help="LLaVA QA json/jsonl to score, with 'category'")
    parser.add_argument("--image-root", type=Path, default=None, help="default: each file's folder")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=None, help="training steps (the first limit reached stops)")
    parser.add_argument("--size", type=int, default=64, help="images are resized to size x size")
    parser.add_argument("--images-per-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.train, args.test, args.minutes, args.steps, args.size, args.images_per_batch, args.lr,
                 args.seed, args.image_root)
    print(f"\n{result['steps']} steps in {result['seconds']:.0f}s on {result['train_questions']} train questions, "
          f"exact match (%):\n")
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
