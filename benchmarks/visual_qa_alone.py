"""How much of a QA data set a recipe's embedder can answer on its own: the embedder and the visual QA head
(`monovlm/train/visual_qa.py`) trained together on the training questions, no decoder, then scored on a test file's
questions per record "category" (records without one: "yes/no" or "other" by the answer).

It separates "the visual tokens cannot hold the answer" from "the decoder does not read it": if the embedder and a
small head answer a test question type well, a VLM with that embedder that does not has a decoder-side problem.

    python benchmarks/visual_qa_alone.py eve-vqa --data /tmp/world2 --test instruct_test.json --steps 900 --images 32
    python benchmarks/visual_qa_alone.py eve-vqa ... --set 'model.vision.stem="patch+conv"'   # any recipe key
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from monovlm.config import VisionConfig
from monovlm.data.image_files import iter_pixels, stage_sources
from monovlm.model.embedders import build_embedder
from monovlm.train.recipe import load_recipe
from monovlm.train.schedule import lr_factor
from monovlm.train.visual_qa import grid_tokens, visual_qa_data, visual_qa_head, visual_qa_loss
from monovlm.train.vit_qa import normalise_answer, question_words, read_qa_pairs, to_square


class EmbedderOnly(torch.nn.Module):  # what visual_qa_loss reads at depth 0
    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder


def category(record: dict, answer: str) -> str:
    return record.get("category") or ("yes/no" if answer in ("yes", "no") else "other")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test", default="instruct_test.json", help="relative to --data")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    vision = VisionConfig(**recipe.model.vision)
    hidden = recipe.model.decoder["hidden_size"]
    data = visual_qa_data(args.data, stage_sources(recipe.stages), vision, args.images, recipe.seed)
    torch.manual_seed(recipe.seed)
    model = EmbedderOnly(build_embedder(vision, hidden))
    head = visual_qa_head(hidden, data, recipe.seed)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, max(1, args.steps // 20), args.steps, 0.1)
        loss = visual_qa_loss(model, head, data.batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started

    # the test questions, read with the training vocabulary and answer classes
    records = {}
    for record in json.loads((args.data / args.test).read_text()):
        human = next((t["value"] for t in record["conversations"] if t["from"] == "human"), "")
        records[(record["image"], " ".join(question_words(human)))] = record
    images, pairs = read_qa_pairs(args.data, [args.test])
    correct, total = defaultdict(int), defaultdict(int)
    model.eval()
    head.eval()
    by_image = defaultdict(list)
    for pair in pairs:
        by_image[pair.image].append(pair)
    with torch.no_grad():
        index_of = {image.key: i for i, image in enumerate(images)}
        for image, pixels in iter_pixels(images, vision):
            index = index_of[image.key]
            grid = grid_tokens(model.embedder, to_square(pixels, data.side)[None])  # (1, N, C)
            questions = by_image[index]
            ids, lengths = data.vocabulary.encode([pair.question for pair in questions])
            predicted = head(grid.expand(len(questions), -1, -1), ids, lengths).argmax(-1).tolist()
            for pair, guess in zip(questions, predicted):
                record = records[(image.key, " ".join(question_words(pair.question)))]
                group = category(record, normalise_answer(pair.answer))
                total[group] += 1
                correct[group] += data.task.answers[guess] == pair.answer
    print(f"{args.steps} steps of {args.images} images in {seconds:.0f}s ({', '.join(args.overrides) or 'recipe as is'})")
    print("| category | questions | embedder + head |\n|---|---:|---:|")
    for group in sorted(total):
        print(f"| {group} | {total[group]} | {100 * correct[group] / total[group]:.1f}% |")
    print(f"| overall | {sum(total.values())} | {100 * sum(correct.values()) / sum(total.values()):.1f}% |")


if __name__ == "__main__":
    main()
