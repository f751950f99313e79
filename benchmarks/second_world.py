"""A second synthetic world for honest tests: shape-VQA data that is *not* `monovlm data synth`.

Recipes are tuned on `monovlm data synth`; they are judged on this. It is a test and benchmark fixture of its own:
nothing in `monovlm/` imports it or reads what it writes. The layout is a user's LLaVA QA folder and nothing else:
```
DIR/images/train_00000.png ...  test_00000.png ...   64x64 RGB PNGs (`--size`)
DIR/instruct.json       training QA, one question per record (LLaVA: id, image, conversations human/gpt)
DIR/instruct_test.json  test QA, same format, each record also carries "category" (yes/no | shape | colour) and
                        "answer_type" (yes/no | other, as VQA names them)
DIR/captions.json       only with --captions: one LLaVA caption per training image (human "<image>", gpt caption)
```
No scene-label file is written; `generate()` returns the scenes (and each question's template) to Python callers.

How it differs from synth.py. Images: coloured, textured backgrounds (a two-colour gradient at a random angle, stripes
or soft blotches, plus pixel noise) instead of grey ones; 1-4 shapes anywhere in the frame (no grid), rotated, of
continuous size, antialiased, each with a slight tint of its colour; kinds star, ring, hexagon, diamond, triangle,
cross; colours red, blue, green, yellow, pink, white. Questions: no positions, counts or words; negations ("Is
there no red star?", "Is no triangle present?", "Is the ring not blue?"), "Does the image contain ...", "Are there
any green shapes?", "What shape is the yellow object?", "What colour is the cross?" and British "colour".

Mix (like the public simple-shapes VQA set this imitates: 64x64, ~9.5 questions per image, ~3/4 yes/no): each image
gets 8-11 distinct questions; each is yes/no with p=0.73, shape with 0.14, colour with 0.13.

Wording priors, on purpose. Every answer is a function of the drawn scene (the image), but each yes/no template
first draws its answer with its own P(yes), then picks what it asks about (a present or an absent object, kind or
colour) to make that answer true:

| template                                   | weight | P(yes) | measured share, P(yes) (4,000 images) |
|--------------------------------------------|--------|--------|---------------------------------------|
| Is there a {colour} {kind}?                | 0.14   | 0.92   | 14.3%, 0.90                           |
| Does the image contain a {colour} {kind}?  | 0.12   | 0.90   | 12.7%, 0.89                           |
| Is there a {kind} in the picture?          | 0.10   | 0.88   | 10.5%, 0.87                           |
| Are there any {colour} shapes?             | 0.10   | 0.82   | 10.9%, 0.80                           |
| Is the {kind} {colour}?                    | 0.10   | 0.88   |  9.2%, 0.86                           |
| Can you see a {colour} {kind}?             | 0.08   | 0.50   |  9.3%, 0.48                           |
| Is there no {colour} {kind}?               | 0.10   | 0.08   | 10.5%, 0.09                           |
| Is no {kind} present?                      | 0.09   | 0.12   |  9.7%, 0.14                           |
| Does the image contain no {colour} shapes? | 0.07   | 0.15   |  7.6%, 0.15                           |
| Is the {kind} not {colour}?                | 0.05   | 0.50   |  5.3%, 0.53                           |

So the affirmative templates are mostly "yes", the negated ones mostly "no", and two are balanced. A blind model that
answers each template's majority gets sum(w * max(p, 1 - p)) / sum(w) = 83% of yes/no questions by construction;
measured (majority per template on 4,000 training images, scored on 1,000 test images, seed 0): 82.3% on yes/no,
21% on shape and colour questions; 75% of questions are yes/no, 61% of those "yes". (The measured priors sit a
little under the nominal ones: a question is not asked twice of one image, and the "yes" pools are small.)
The asked colour and kind carry almost nothing beyond the template: in a "yes" they are a present object's, in a
"no" an absent one's, both weighted by the same mildly skewed frequencies. "Is the {kind} ..." templates (and "What
colour is the {kind}?") are asked only about a kind that occurs once in the scene, "What shape is the {colour}
object?" only about a colour that occurs once, so every answer is unique. Shape and colour answers are the scene's:
blind, a model can only guess the most frequent kind or colour (~1/5).

Determinism: image i of a split comes from numpy.random.default_rng([seed, split, i, stream]) only, so the first k
images (and their questions) of a run with more images are those of a run with k.

    python benchmarks/second_world.py --out /tmp/world2 --images 4000 --test-images 1000 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

KINDS: tuple[str, ...] = ("star", "ring", "hexagon", "diamond", "triangle", "cross")
KIND_WEIGHTS: tuple[float, ...] = (0.20, 0.18, 0.17, 0.16, 0.15, 0.14)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 45),
    "blue": (45, 105, 235),
    "green": (55, 180, 75),
    "yellow": (245, 215, 50),
    "pink": (245, 135, 200),
    "white": (245, 245, 240),
}
COLOUR_WEIGHTS: tuple[float, ...] = (0.19, 0.18, 0.17, 0.16, 0.15, 0.15)
SHAPE_COUNTS, SHAPE_COUNT_WEIGHTS = (1, 2, 3, 4), (0.2, 0.3, 0.3, 0.2)
TEXTURES: tuple[str, ...] = ("gradient", "stripes", "blotches")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: antialiased edges
CATEGORIES: tuple[str, ...] = ("yes/no", "shape", "colour")
CATEGORY_WEIGHTS: tuple[float, ...] = (0.73, 0.14, 0.13)
QUESTIONS_PER_IMAGE = (8, 11)  # inclusive
SPLITS = {"train": 0, "test": 1}
_SCENE, _BACKGROUND, _QUESTIONS = range(3)


@dataclass(frozen=True)
class YesNoTemplate:
    text: str  # with {c} and/or {k}
    asks: str  # "object" (colour and kind) | "kind" | "colour" | "attribute" (the unique kind's colour)
    negated: bool  # the answer is "yes" iff the asked thing is NOT there / NOT so
    weight: float
    p_yes: float


YES_NO_TEMPLATES: tuple[YesNoTemplate, ...] = (
    YesNoTemplate("Is there a {c} {k}?", "object", False, 0.14, 0.92),
    YesNoTemplate("Does the image contain a {c} {k}?", "object", False, 0.12, 0.90),
    YesNoTemplate("Is there a {k} in the picture?", "kind", False, 0.10, 0.88),
    YesNoTemplate("Are there any {c} shapes?", "colour", False, 0.10, 0.82),
    YesNoTemplate("Is the {k} {c}?", "attribute", False, 0.10, 0.88),
    YesNoTemplate("Can you see a {c} {k}?", "object", False, 0.08, 0.50),
    YesNoTemplate("Is there no {c} {k}?", "object", True, 0.10, 0.08),
    YesNoTemplate("Is no {k} present?", "kind", True, 0.09, 0.12),
    YesNoTemplate("Does the image contain no {c} shapes?", "colour", True, 0.07, 0.15),
    YesNoTemplate("Is the {k} not {c}?", "attribute", True, 0.05, 0.50),
)
SHAPE_TEMPLATES = ("What shape is the {c} object?", "What is the {c} shape?", "Which shape is {c}?")
COLOUR_TEMPLATES = ("What colour is the {k}?", "What is the colour of the {k}?", "Which colour does the {k} have?")


def blind_yes_no_accuracy() -> float:
    """What answering each yes/no template's majority gets, by construction (the docstring's 83%)."""
    total = sum(t.weight for t in YES_NO_TEMPLATES)
    return sum(t.weight * max(t.p_yes, 1 - t.p_yes) for t in YES_NO_TEMPLATES) / total


def wording(question: str) -> str:
    """The question with its colour and kind words masked: what a blind model's prior can key on."""
    question = re.sub(r"\b(" + "|".join(COLOURS) + r")\b", "{c}", question)
    return re.sub(r"\b(" + "|".join(KINDS) + r")\b", "{k}", question)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre and radius in pixels of the final image
    cy: float
    r: float
    angle: float  # radians
    tint: tuple[int, int, int]  # the drawn RGB: the palette colour, slightly shifted


@dataclass(frozen=True)
class Scene:
    size: int
    texture: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def has(self, colour: str | None = None, kind: str | None = None) -> bool:
        return any((colour is None or s.colour == colour) and (kind is None or s.kind == kind) for s in self.shapes)

    def unique(self, attribute: str) -> list[Shape]:
        """Shapes whose `attribute` ("kind" or "colour") no other shape in the scene shares."""
        counts = Counter(getattr(s, attribute) for s in self.shapes)
        return [s for s in self.shapes if counts[getattr(s, attribute)] == 1]


def _weighted(rng: np.random.Generator, items, weights) -> Any:
    return items[int(rng.choice(len(items), p=np.asarray(weights) / sum(weights)))]


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(_weighted(rng, SHAPE_COUNTS, SHAPE_COUNT_WEIGHTS))
    shapes: list[Shape] = []
    for _ in range(n):
        kind, colour = _weighted(rng, KINDS, KIND_WEIGHTS), _weighted(rng, list(COLOURS), COLOUR_WEIGHTS)
        for _attempt in range(100):  # rejection: shapes never overlap, so each one is fully visible
            r = size * rng.uniform(0.10, 0.19)
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - s.cx, cy - s.cy) > r + s.r + 1 for s in shapes):
                break
        else:
            continue  # no room left: fewer shapes
        tint = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[colour])
        shapes.append(Shape(kind, colour, float(cx), float(cy), float(r), float(rng.uniform(0, 2 * math.pi)), tint))
    return Scene(size=size, texture=TEXTURES[int(rng.integers(len(TEXTURES)))], shapes=tuple(shapes))


def _muted(rng: np.random.Generator) -> np.ndarray:
    # dim, greyish colours: every palette colour (white and yellow included) stands out against them
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.10, 0.40), rng.uniform(0.25, 0.55))
    return np.array(rgb) * 255.0


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.size
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)  # (H, W) in [0, 1]
    a, b = _muted(rng), _muted(rng)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    if scene.texture == "stripes":  # soft stripes across the ramp's direction
        period = rng.uniform(5, 12) / size
        ramp = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(angle + 1.3) * x + np.sin(angle + 1.3) * y) / period)
        ramp = 0.35 + 0.3 * ramp
    elif scene.texture == "blotches":  # low-frequency noise: a 5x5 random field, bicubically upsampled
        coarse = Image.fromarray((rng.uniform(size=(5, 5)) * 255).astype(np.uint8), mode="L")
        ramp = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    image = a[None, None, :] * (1 - ramp[:, :, None]) + b[None, None, :] * ramp[:, :, None]  # (H, W, 3)
    image = image + rng.normal(0.0, rng.uniform(4, 12), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _polygon(shape: Shape, points: list[tuple[float, float]], scale: int) -> list[tuple[float, float]]:
    """Unit-radius points, rotated by the shape's angle, placed at its centre, in supersampled pixels."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    return [((shape.cx + shape.r * (c * px - s * py)) * scale, (shape.cy + shape.r * (s * px + c * py)) * scale)
            for px, py in points]


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: int) -> None:
    fill = shape.tint + (255,)
    if shape.kind == "ring":
        cx, cy, r = shape.cx * scale, shape.cy * scale, shape.r * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.38 * r)))
        return
    if shape.kind == "star":
        outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
        points = [p for pair in zip(outer, inner) for p in pair]
    elif shape.kind == "hexagon":
        points = _regular(6, 0.95)
    elif shape.kind == "diamond":
        points = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif shape.kind == "triangle":
        points = _regular(3, 1.0, -math.pi / 2)
    elif shape.kind == "cross":
        a = 0.3
        points = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
                  (-a, -a)]
    else:
        raise ValueError(f"unknown kind {shape.kind!r}; expected one of {KINDS}")
    draw.polygon(_polygon(shape, points, scale), fill=fill)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    background = Image.fromarray(_background(scene, rng), mode="RGB")
    big = scene.size * SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for shape in scene.shapes:
        _draw_shape(draw, shape, SUPERSAMPLE)
    layer = layer.resize((scene.size, scene.size), Image.Resampling.BOX)
    background.paste(layer, (0, 0), layer)  # the layer's alpha: antialiased edges over the texture
    return background


def caption(scene: Scene) -> str:
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.texture if scene.texture != 'blotches' else 'mottled'} background."


# ---------------------------------------------------------------------------------------------------------------
# Questions


def _candidates(scene: Scene, template: YesNoTemplate, there: bool) -> list[tuple[str | None, str | None, float]]:
    """(colour, kind, weight) of the things the template can ask about so that they hold (`there`) or not."""
    colours, kinds = list(COLOURS), list(KINDS)
    cw, kw = dict(zip(colours, COLOUR_WEIGHTS)), dict(zip(kinds, KIND_WEIGHTS))
    if template.asks == "object":
        return [(c, k, cw[c] * kw[k]) for c in colours for k in kinds if scene.has(c, k) == there]
    if template.asks == "kind":
        return [(None, k, kw[k]) for k in kinds if scene.has(kind=k) == there]
    if template.asks == "colour":
        return [(c, None, cw[c]) for c in colours if scene.has(colour=c) == there]
    out = []  # attribute: a kind that occurs once, with its colour ("yes") or another one ("no")
    for shape in scene.unique("kind"):
        pool = [c for c in colours if (c == shape.colour) == there]
        out += [(c, shape.kind, cw[c] / sum(cw[p] for p in pool)) for c in pool]  # each shape weighs the same
    return out


def _yes_no(scene: Scene, rng: np.random.Generator, asked: set[str]) -> dict[str, str] | None:
    templates = list(YES_NO_TEMPLATES)
    for _attempt in range(20):
        template = _weighted(rng, templates, [t.weight for t in templates])
        yes = bool(rng.random() < template.p_yes)
        there = yes != template.negated  # whether the asked thing must hold in the scene
        # Questions already asked of this image are left out of the pool, rather than redrawing the answer: "yes"
        # pools are small (the 1-4 shapes present), so redrawing would wear the templates' priors down.
        pool = [(c, k, w) for c, k, w in _candidates(scene, template, there)
                if template.text.format(c=c, k=k) not in asked]
        if pool:  # empty e.g. for "Is the {kind} ...?" when no kind occurs once: draw another template
            colour, kind, _ = _weighted(rng, pool, [w for _, _, w in pool])
            return {"category": "yes/no", "question": template.text.format(c=colour, k=kind),
                    "answer": "yes" if yes else "no", "template": template.text}
    return None


def _shape_or_colour(scene: Scene, rng: np.random.Generator, category: str,
                     asked: set[str]) -> dict[str, str] | None:
    by = "colour" if category == "shape" else "kind"  # what names the object in the question
    templates = SHAPE_TEMPLATES if category == "shape" else COLOUR_TEMPLATES
    pool = [(shape, template) for shape in scene.unique(by) for template in templates
            if template.format(c=shape.colour, k=shape.kind) not in asked]
    if not pool:  # no colour (kind) occurs once, or all asked: "the {colour} object" would be ambiguous
        return None
    shape, template = pool[int(rng.integers(len(pool)))]
    return {"category": category, "question": template.format(c=shape.colour, k=shape.kind),
            "answer": shape.kind if category == "shape" else shape.colour, "template": template}


def questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """8-11 distinct questions about the scene, each with its category, answer and template."""
    wanted = int(rng.integers(QUESTIONS_PER_IMAGE[0], QUESTIONS_PER_IMAGE[1] + 1))
    out: list[dict[str, str]] = []
    asked: set[str] = set()
    for _attempt in range(wanted * 10):
        if len(out) == wanted:
            break
        category = _weighted(rng, CATEGORIES, CATEGORY_WEIGHTS)
        qa = _yes_no(scene, rng, asked) if category == "yes/no" else _shape_or_colour(scene, rng, category, asked)
        if qa is not None and qa["question"] not in asked:
            asked.add(qa["question"])
            out.append(qa)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The folder


@dataclass
class World:
    """What `generate` wrote, for tests: scenes by image path, and each split's questions with their templates."""
    scenes: dict[str, Scene]
    questions: dict[str, list[dict[str, str]]]  # split -> [{image, category, question, answer, template}]


def _llava(record_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def generate(out: str | Path, images: int = 4000, test_images: int = 1000, seed: int = 0, size: int = 64,
             captions: bool = False, progress: bool = True) -> World:
    """Write the folder (see the module docstring) and return its scenes and questions."""
    if images < 1 or test_images < 1 or size < 16:
        raise ValueError(f"need images >= 1, test_images >= 1 and size >= 16; got {images}, {test_images}, {size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = World(scenes={}, questions={"train": [], "test": []})
    records: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    caption_records: list[dict[str, Any]] = []
    jobs = [("train", i) for i in range(images)] + [("test", i) for i in range(test_images)]
    for split, index in tqdm(jobs, desc="second world", disable=not progress or len(jobs) < 500):
        key = [seed, SPLITS[split], index]
        scene = sample_scene(np.random.default_rng(key + [_SCENE]), size)
        name = f"images/{split}_{index:05d}.png"
        render(scene, np.random.default_rng(key + [_BACKGROUND])).save(out / name, format="PNG", optimize=False)
        world.scenes[name] = scene
        for number, qa in enumerate(questions(scene, np.random.default_rng(key + [_QUESTIONS]))):
            record = _llava(f"{split}_{index:05d}_q{number}", name, qa["question"], qa["answer"])
            if split == "test":
                record["category"] = qa["category"]
                record["answer_type"] = "yes/no" if qa["category"] == "yes/no" else "other"
            records[split].append(record)
            world.questions[split].append({"image": name, **qa})
        if captions and split == "train":
            caption_records.append({"id": f"{split}_{index:05d}", "image": name, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]})
    (out / "instruct.json").write_text(json.dumps(records["train"], indent=1) + "\n")
    (out / "instruct_test.json").write_text(json.dumps(records["test"], indent=1) + "\n")
    if captions:
        (out / "captions.json").write_text(json.dumps(caption_records, indent=1) + "\n")
    return world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (images/, instruct.json, instruct_test.json)")
    parser.add_argument("--images", type=int, default=4000, help="training images")
    parser.add_argument("--test-images", type=int, default=1000, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--captions", action="store_true", help="also write captions.json (training images)")
    args = parser.parse_args(argv)
    world = generate(args.out, args.images, args.test_images, args.seed, args.size, args.captions)
    for split, qas in world.questions.items():
        counts = Counter(q["category"] for q in qas)
        yes = sum(q["answer"] == "yes" for q in qas) / max(counts["yes/no"], 1)
        print(f"{split}: {len(qas)} questions, " + ", ".join(f"{c} {counts[c] / len(qas):.1%}" for c in CATEGORIES)
              + f"; yes share of yes/no {yes:.1%}")
    print(f"wrote {args.out} (blind yes/no prior by construction: {blind_yes_no_accuracy():.1%})")


if __name__ == "__main__":
    main()
