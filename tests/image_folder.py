"""A user's LLaVA-format folder, as `monovlm data synth` would never write it: plain PNG images in a sub-folder (no
scenes.json, no labels), a captions file and a QA file naming them. Used by the teacher and ViT-pretraining tests."""

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
