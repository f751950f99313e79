"""A user's LLaVA-format folder, as `monovlm data synth` would never write it: plain PNG images in a sub-folder (no
scenes.json, no labels), a captions file and a QA file naming them. Used by the teacher, ViT-pretraining and visual
QA tests."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_llava_folder(root: Path, n: int = 12, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """`root/photos/img_XX.png` (a coloured rectangle on a noisy background), `root/captions.json` (one caption per
    image) and `root/qa.json` (one question per image); returns root."""
    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    captions, questions = [], []
    height, width = size
    for index in range(n):
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        colour = rng.integers(80, 256, 3, dtype=np.uint8)
        pixels[top:top + height // 2, left:left + width // 2] = colour
        name = f"photos/img_{index:02d}.png"
        Image.fromarray(pixels).save(root / name)
        captions.append({"id": f"c{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a rectangle, number {index}"}]})
        questions.append({"id": f"q{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nIs there a rectangle?"}, {"from": "gpt", "value": "yes"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "qa.json").write_text(json.dumps(questions))
    return root


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def write_colour_qa(root: Path, n: int = 60, seed: int = 0, multi_turn: bool = True) -> Path:
    """n 32×32 images `root/images/I.png`, each a red or blue square at a random place on a dark noisy background, and
    `root/qa.json` asking its colour ("What colour is the square?" -> red/blue: answerable from the image only, 50/50
    blind). `multi_turn`: one record per image that also asks for a description (a long answer); else one record per
    question, the colour one and "Is there a square?" -> yes. Returns root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for index in range(n):
        colour = ["red", "blue"][index % 2]
        pixels = rng.integers(0, 50, (32, 32, 3), dtype=np.uint8)
        top, left = rng.integers(0, 20, size=2)
        pixels[top:top + 12, left:left + 12] = COLOURS[colour]
        Image.fromarray(pixels).save(root / f"images/{index}.png")
        ask = {"from": "human", "value": "<image>\nWhat colour is the square?"}
        if multi_turn:
            records.append({"id": str(index), "image": f"images/{index}.png", "conversations": [
                ask, {"from": "gpt", "value": colour}, {"from": "human", "value": "Describe the picture."},
                {"from": "gpt", "value": "A small coloured square on a dark background."}]})
            continue
        for number, (question, answer) in enumerate([(ask, colour), (
                {"from": "human", "value": "<image>\nIs there a square?"}, "yes")]):
            records.append({"id": f"{index}_{number}", "image": f"images/{index}.png",
                            "conversations": [question, {"from": "gpt", "value": answer}]})
    (root / "qa.json").write_text(json.dumps(records))
    return root
