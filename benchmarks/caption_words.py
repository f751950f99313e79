"""Which object attributes a model can *say*: teacher-forced accuracy of the colour, size and kind words in captions.

For the first test-split scene images of a `monovlm data synth` folder, feed the image and its true caption
(scenes.json's "a large red circle at the top left and ...") with the `plain` template, and count how often the model's next-token argmax is
the true word at each colour, size and kind word of the caption. Each word follows the words before it (the caption
says "large red" before "circle"), so this measures whether the decoder reads that attribute of the object it is
describing off the visual tokens — beside `probe_visual_tokens.py`, which asks whether the tokens hold it at all.
Use it on a checkpoint of the caption stages (e.g. RUN/checkpoints/step_000500 of the eve recipe): after
instruction tuning a model answers in the chat template and no longer continues plain captions.

    python benchmarks/caption_words.py --model runs/quickstart/run/checkpoints/step_000500 --data runs/quickstart/data

Prints one row: accuracy (%) per attribute and the share of the most frequent word (what guessing gives).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from monovlm.data import synthetic as syn

ATTRIBUTES = {"color": tuple(syn.COLORS), "size": syn.SIZES, "kind": syn.KINDS}


def caption_word_accuracy(model, tokenizer, data: Path, scenes: list[dict]) -> dict[str, tuple[float, float, int]]:
    """attribute -> (accuracy, majority-word share, words) over the attribute words of the scenes' true captions."""
    from monovlm.config import ProcessorConfig
    from monovlm.data.processor import Processor

    processor = Processor(tokenizer, model.config.vision, ProcessorConfig(template="plain", max_length=4096))
    word_of = {}  # token id -> (attribute, word): each attribute word must be one token after a space
    for attribute, words in ATTRIBUTES.items():
        for word in words:
            ids = tokenizer.encode(" " + word)
            if len(ids) != 1:
                raise SystemExit(f"the tokenizer splits {word!r} into {len(ids)} tokens; this probe needs one")
            word_of[ids[0]] = (attribute, word)
    hits: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    seen: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    model.eval()
    with torch.no_grad():
        for record in tqdm(scenes, desc="captions", leave=False):
            sample = processor.process({"image": record["image"], "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": record["caption"]}]}, image_root=data)
            predicted = model(torch.tensor([sample.input_ids]), sample.images)[0].argmax(-1)  # (T,)
            for position, token in enumerate(sample.input_ids[1:], start=1):
                if token in word_of:
                    attribute, word = word_of[token]
                    hits[attribute].append(int(predicted[position - 1] == token))
                    seen[attribute][word] += 1
    return {a: (sum(h) / len(h) if h else float("nan"),
                max(seen[a].values()) / len(h) if h else float("nan"), len(h)) for a, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (a checkpoint of the caption stages)")
    parser.add_argument("--data", type=Path, required=True, help="a `monovlm data synth` folder")
    parser.add_argument("--scenes", type=int, default=300, help="most test scene images to read")
    args = parser.parse_args()

    from monovlm.eval.run import resolve_model
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.tokenizer import Tokenizer

    folder = resolve_model(args.model)
    model, tokenizer = EncoderFreeVLM.load(folder), Tokenizer.from_folder(folder)
    records = json.loads((args.data / "scenes.json").read_text())
    scenes = [r for r in records if r["type"] == "scene" and r["split"] == "test"][: args.scenes]
    if not scenes:
        raise SystemExit(f"{args.data / 'scenes.json'} has no test-split shape scenes")
    results = caption_word_accuracy(model, tokenizer, args.data, scenes)
    print(f"{len(scenes)} test scenes; teacher-forced next-word accuracy (%), beside always saying the commonest word")
    print("| attribute | words | accuracy | commonest word |")
    print("|---|---:|---:|---:|")
    for attribute, (accuracy, majority, count) in results.items():
        print(f"| {attribute} | {count} | {100 * accuracy:.1f} | {100 * majority:.1f} |")


if __name__ == "__main__":
    main()
