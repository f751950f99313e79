"""Seeded, offline synthetic vision-language data: shape scenes, questions about them, and mazes.

The point is to make a tiny encoder-free model's *use of the image* measurable on a laptop CPU. Every answer here
is a function of the pixels, so a model that ignores the image can only reach the language-prior baseline; the
categories (attribute, counting, spatial, reading, existence, maze) show which visual skill is missing.

What one call to `synthesize(out_dir, n, seed)` writes:
```
out_dir/images/000000.png ...   one image per index (shape scene or maze), deterministic PNG, no metadata
out_dir/captions.json           LLaVA captions, train-split images only
out_dir/instruct.json           LLaVA single-turn QA, one question per entry, train-split images
out_dir/instruct_test.json      same for test-split images (a test image never appears in any train file)
out_dir/scenes.json             per-image ground truth (shapes with pixel centres, text, maze passages)
out_dir/summary.json            counts per split, category, answer and POPE split (also returned)
```

Determinism. Each image comes from `numpy.random.default_rng([seed, index, stream])`, so image `i` depends on
(seed, i) only: the first k images, captions and non-existence questions of a run with n > k are those of a run
with n = k. Split, scene/maze choice and maze loopiness use low-discrepancy (Weyl) sequences in the index, so every
prefix holds the requested fractions to within a few items, again independent of n; loop and loop-free mazes
alternate within each split, so maze answers are balanced to within one per split. The one exception, by
design: POPE's "popular" and "adversarial" negatives (test split) rank objects by frequency / co-occurrence
*measured on the generated set*, exactly as POPE measures them on its image set, so those negatives can change with
n. With `train_negatives="balanced"` the train split's existence negatives are name-balanced instead (the answer
cannot be read from the question), chosen greedily in index order, so they are the same in every prefix.

Scenes. A 3x3 grid of cells; 1-4 shapes each take a distinct cell (jittered inside it), so shapes never overlap and
"where is X?" always has exactly one answer. Optionally a word is written across one whole row of cells (no shape
there). Shapes are drawn without antialiasing, so the pixel at a shape's recorded centre is exactly its colour.

Mazes. A closed square grid maze (walls dark, passages light) of 3-4 cells per side by default (`maze_cells`;
see MAZE_CELLS for why). Perfect mazes are spanning trees (no loops); loop
mazes open 1-3 extra interior walls. The label is *read back from the rendered pixels* (`maze_topology`): cells
and wall midpoints are sampled, the passage graph is built, and loops = edges - nodes + components (the first
Betti number of the free space). Generation checks that the pixel label equals the construction.

Dense labels. `pixel_labels` reads each pixel's colour and kind class (shape kind, text, maze wall or background)
back from a scenes.json record and its image: the targets of the ViT teacher's pre-training.

Answers are short and lowercase: a colour, a shape, small/large, a position ("top left" ... "bottom right"), a digit
"0"-"4", yes/no, or the written word.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary. Order matters: it is the deterministic tie-break everywhere below.

COLORS: dict[str, tuple[int, int, int]] = {  # saturated and far apart in RGB, none close to the grey backgrounds
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 215, 20),
    "purple": (140, 50, 190),
    "orange": (255, 135, 0),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
# Mild skew, so POPE's "popular" split has something to find and a blind model has a (measurable) prior to exploit.
COLOR_WEIGHTS: tuple[float, ...] = (0.24, 0.20, 0.18, 0.14, 0.12, 0.12)
KIND_WEIGHTS: tuple[float, ...] = (0.34, 0.28, 0.22, 0.16)
# Co-occurrence structure for POPE's "adversarial" split: later shapes often share the colour or kind of an earlier one.
SHARE_COLOR_P = 0.3
SHARE_KIND_P = 0.2

GRID = 3
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_POSITION_PHRASE = {  # caption wording for each answer word
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
_ROW_PHRASE = ("at the top", "in the middle", "at the bottom")

BACKGROUNDS: dict[str, int] = {"white": 245, "light gray": 200, "dark gray": 64, "black": 16}  # grey levels
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "noise")
GRADIENT_SPAN = 40  # grey levels from one side to the other; the direction keeps light backgrounds light
NOISE_STD = 10.0

WORDS: tuple[str, ...] = (  # 2-4 uppercase letters; none is an answer word of another category
    "GO", "UP", "HI", "OX",
    "CAT", "DOG", "SUN", "BOX", "KEY", "MAP", "CUP", "HAT",
    "FISH", "BIRD", "TREE", "MOON", "LAMP", "SHIP", "FROG", "KITE",
)
TEXT_P = 0.3  # share of scenes with a word

# Inclusive range of cells per side. Sized for the toy scale: fine-tuning the quickstart model on maze questions only,
# 3-4 cell mazes reach 65% after 50 steps and 94% after 200, while 4-6 cell mazes stay at chance (50%) for ~150
# steps and reach 77% after 400, too slow to be learnt beside the scene questions in the quickstart's budget.
# Larger mazes (harder: longer loops) with `synthesize(maze_cells=(4, 6))` or `monovlm data synth --maze-max-cells 6`.
MAZE_CELLS = (3, 4)
MAZE_EXTRA_PASSAGES = (1, 3)  # inclusive range of extra opened walls in loop mazes
MAZE_STYLES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (  # (wall, floor): dark on light
    ((20, 20, 20), (245, 245, 245)),
    ((30, 40, 110), (250, 245, 225)),
    ((90, 30, 30), (235, 240, 250)),
)

CATEGORIES: tuple[str, ...] = ("attribute", "counting", "spatial", "reading", "existence", "maze")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
# How the *train* split's existence negatives are drawn (`synthesize(train_negatives=...)`). "pope" (default): as the
# test split's, one of POPE's three samplers per image. POPE's samplers are an evaluation device, though: "popular"
# asks the most frequent absent object every time, so on POPE-sampled training questions the name alone predicts the
# answer (64.5% on the quickstart's 5,120 train questions: "a red circle" is asked absent 828 times, present 214) and
# a tiny model learns that prior. "balanced": each object is asked absent as often as it has been asked present
# (greedy, in index order), so the question says nothing about the answer (50.0%) and only the image can help; the
# test split keeps POPE's samplers either way, so `synthetic_pope` still measures how far a model follows them.
# What a synthetic data folder holds, recorded in its summary.json: 2 added the existence drills (colour_train.json,
# existence_train.json, instruct_train_no_existence.json); 3 names the train files as LLaVA's two-file layout
# (captions.json, instruct.json), so the generic recipes read them too
DATA_FORMAT = 3
POPE, BALANCED = "pope", "balanced"


def qa_file(split: str) -> str:
    """The QA file of a split: instruct.json (train, LLaVA's name) or instruct_test.json."""
    return "instruct.json" if split == "train" else f"instruct_{split}.json"

TRAIN_NEGATIVES: tuple[str, ...] = (POPE, BALANCED)
OBJECTS: tuple[str, ...] = tuple(f"{c} {k}" for c in COLORS for k in KINDS)  # existence vocabulary (POPE "objects")
EXISTENCE_PAIRS = 1  # (yes, no) question pairs per scene image, fewer when the scene has fewer distinct objects
MAX_SHAPES = 4
MIN_IMAGE_SIZE = 32

# Independent random streams per index, so e.g. changing the question logic never changes an image.
_PLAN, _SCENE, _NOISE, _QUESTIONS, _EXISTENCE, _MAZE, _DRILLS = range(7)
# Weyl-sequence strides: 1 and these two are linearly independent over the rationals, so the two index sequences
# (test split, maze) are jointly equidistributed and do not correlate with each other.
_ALPHA_TEST = (math.sqrt(5.0) - 1.0) / 2.0
_ALPHA_MAZE = math.sqrt(2.0) - 1.0

__all__ = [
    "BACKGROUNDS", "BALANCED", "CATEGORIES", "COLORS", "KINDS", "OBJECTS", "POPE", "POPE_SPLITS", "POSITIONS", "SIZES",
    "COLOUR_CLASSES", "COLOUR_QUESTION", "DATA_FORMAT", "EXISTENCE_DRILLS", "KIND_CLASSES", "TEXT_CONTRAST",
    "TRAIN_NEGATIVES", "WORD_CLASSES", "WORDS",
    "Background", "Maze", "MazeTopology", "PopeStats", "Scene", "Shape",
    "colour_questions", "existence_questions", "independent_existence_questions", "maze_caption", "maze_geometry",
    "maze_questions", "maze_topology", "nearest_color", "pixel_labels",
    "pope_statistics", "render_maze", "render_scene", "sample_maze", "sample_scene", "scene_caption",
    "scene_questions", "synthesize",
]


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # grid cell, 0..2 left to right
    cx: int  # pixel centre; the pixel there is exactly COLORS[color]
    cy: int
    r: int  # half extent in pixels: the shape lies in [cx - r, cx + r] x [cy - r, cy + r]

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:  # the POPE object name
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Background:
    style: str  # plain | gradient | noise
    color: str  # key of BACKGROUNDS
    direction: str | None = None  # gradient only: horizontal | vertical
    noise_seed: int | None = None  # noise only

    @property
    def is_dark(self) -> bool:
        return BACKGROUNDS[self.color] < 128


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: Background
    shapes: tuple[Shape, ...]
    word: str | None = None  # uppercase, as drawn
    word_row: int | None = None  # grid row the word spans


def _cell_bounds(image_size: int) -> list[int]:
    return [round(k * image_size / GRID) for k in range(GRID + 1)]


def _shape_radius(image_size: int, size: str) -> int:
    cell = image_size / GRID
    return max(2, int(cell * (0.40 if size == "large" else 0.24)))


def _weighted(rng: np.random.Generator, items: Sequence[str], weights: Sequence[float]) -> str:
    return items[int(rng.choice(len(items), p=np.asarray(weights) / sum(weights)))]


def sample_scene(seed: int, index: int, image_size: int = 64) -> Scene:
    """The scene for (seed, index): a function of these three values only."""
    rng = np.random.default_rng([seed, index, _SCENE])
    color = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    style = BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    background = Background(
        style=style,
        color=color,
        direction=("horizontal", "vertical")[int(rng.integers(2))] if style == "gradient" else None,
        noise_seed=int(rng.integers(2**31)) if style == "noise" else None,
    )
    word = word_row = None
    if rng.random() < TEXT_P:
        word = WORDS[int(rng.integers(len(WORDS)))]
        word_row = int(rng.integers(GRID))
    free_cells = [(r, c) for r in range(GRID) for c in range(GRID) if r != word_row]
    n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    cells = [free_cells[i] for i in rng.choice(len(free_cells), size=n_shapes, replace=False)]
    bounds = _cell_bounds(image_size)
    shapes: list[Shape] = []
    for row, col in cells:
        kind = _weighted(rng, KINDS, KIND_WEIGHTS)
        shape_color = _weighted(rng, list(COLORS), COLOR_WEIGHTS)
        if shapes:
            u = rng.random()
            earlier = shapes[int(rng.integers(len(shapes)))]
            if u < SHARE_COLOR_P:
                shape_color = earlier.color
            elif u < SHARE_COLOR_P + SHARE_KIND_P:
                kind = earlier.kind
        size = SIZES[int(rng.integers(len(SIZES)))]
        r = _shape_radius(image_size, size)
        cx = _jitter(rng, bounds[col], bounds[col + 1], r)
        cy = _jitter(rng, bounds[row], bounds[row + 1], r)
        shapes.append(Shape(kind=kind, color=shape_color, size=size, row=row, col=col, cx=cx, cy=cy, r=r))
    shapes.sort(key=lambda s: (s.row, s.col))  # reading order: captions and ids never depend on sampling order
    return Scene(image_size=image_size, background=background, shapes=tuple(shapes), word=word, word_row=word_row)


def _jitter(rng: np.random.Generator, lo_edge: int, hi_edge: int, r: int) -> int:
    # keep a 1-pixel gap to the cell edge: shapes in neighbouring cells never touch
    lo, hi = lo_edge + r + 1, hi_edge - 2 - r
    if hi < lo:
        return (lo_edge + hi_edge - 1) // 2
    return int(rng.integers(lo, hi + 1))


def _background_array(background: Background, image_size: int) -> np.ndarray:
    level = float(BACKGROUNDS[background.color])
    grey = np.full((image_size, image_size), level, dtype=np.float64)  # (H, W)
    if background.style == "gradient":
        toward = -GRADIENT_SPAN if level >= 128 else GRADIENT_SPAN  # toward mid-grey, never across it
        ramp = np.linspace(0.0, toward, image_size)
        grey = grey + (ramp[None, :] if background.direction == "horizontal" else ramp[:, None])
    elif background.style == "noise":
        grey = grey + np.random.default_rng(background.noise_seed).normal(0.0, NOISE_STD, grey.shape)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    cx, cy, r, fill = shape.cx, shape.cy, shape.r, COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        s = max(1, round(r * 0.85))  # a full-extent square looks much bigger than the circle of the same size
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape.kind == "cross":
        a = max(1, r // 3)
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {KINDS}")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 with FreeType: the bundled, scalable Aileron (basic layout, no raqm: same glyphs everywhere the
    # FreeType version is the same). Without FreeType: a fixed ~11 px bitmap font, scaled up in _draw_word.
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def _draw_word(image: Image.Image, word: str, row: int, dark_background: bool) -> None:
    size = image.size[0]
    bounds = _cell_bounds(size)
    top, bottom = bounds[row], bounds[row + 1]
    band_h, max_w = bottom - top, int(size * 0.9)
    fill = (240, 240, 240) if dark_background else (16, 16, 16)
    font = _font(max(8, round(band_h * 0.75)))
    if isinstance(font, ImageFont.FreeTypeFont):
        for points in range(int(font.size), 5, -1):  # the largest size that fits the band
            font = _font(points)
            left, upper, right, lower = font.getbbox(word)
            if right - left <= max_w and lower - upper <= band_h * 0.8:
                break
        x = (size - (right - left)) // 2 - left
        y = top + (band_h - (lower - upper)) // 2 - upper
        ImageDraw.Draw(image).text((x, y), word, font=font, fill=fill)
        return
    # Bitmap fallback: draw at native size, then scale up by an integer factor with NEAREST to stay legible.
    left, upper, right, lower = font.getbbox(word)
    w, h = right - left, lower - upper
    scale = max(1, min(max_w // max(w, 1), int(band_h * 0.8) // max(h, 1)))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((-left, -upper), word, font=font, fill=255)
    mask = mask.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    x, y = (size - mask.size[0]) // 2, top + (band_h - mask.size[1]) // 2
    image.paste(Image.new("RGB", mask.size, fill), (x, y), mask)


def render_scene(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background_array(scene.background, scene.image_size), mode="RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    if scene.word is not None and scene.word_row is not None:
        _draw_word(image, scene.word, scene.word_row, scene.background.is_dark)
    return image


def nearest_color(rgb: Sequence[int]) -> str:
    """Name of the palette colour closest to `rgb` (used to check colour answers against pixels)."""
    values = [int(v) for v in rgb]  # numpy uint8 pixels would wrap around in the subtraction
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], values)))


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def scene_caption(scene: Scene) -> str:
    """e.g. 'a large red circle at the top left and a small blue square at the bottom right.'"""
    parts = [f"{_article(f'{s.size} {s.color} {s.kind}')} {_POSITION_PHRASE[s.position]}" for s in scene.shapes]
    caption = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caption += "."
    if scene.word is not None and scene.word_row is not None:
        caption += f' the word "{scene.word.lower()}" is written {_ROW_PHRASE[scene.word_row]}.'
    return caption


# ---------------------------------------------------------------------------------------------------------------
# Scene questions. Each is asked only when its answer is unambiguous in the scene.

_DESCRIPTORS: tuple[tuple[str, ...], ...] = (
    ("kind",), ("color",), ("color", "kind"), ("size", "kind"), ("size", "color"), ("size", "color", "kind"),
)


def _matches(shape: Shape, other: Shape, attributes: Iterable[str]) -> bool:
    return all(getattr(shape, a) == getattr(other, a) for a in attributes)


def _unique_descriptors(scene: Scene, shape: Shape, exclude: str | None = None) -> list[tuple[str, ...]]:
    """Attribute sets that pick out `shape` alone (optionally never using attribute `exclude`)."""
    return [
        d for d in _DESCRIPTORS
        if exclude not in d and sum(_matches(shape, o, d) for o in scene.shapes) == 1
    ]


def _phrase(shape: Shape, descriptor: tuple[str, ...]) -> str:
    words = [getattr(shape, a) for a in ("size", "color") if a in descriptor]
    words.append(shape.kind if "kind" in descriptor else "object")
    return " ".join(words)


def _qa(category: str, question: str, answer: str, **extra: str) -> dict[str, str]:
    return {"category": category, "question": question, "answer": answer, **extra}


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _attribute_question(scene: Scene, rng: np.random.Generator) -> dict[str, str] | None:
    options = []  # (asked attribute, shape, descriptor)
    for shape in scene.shapes:
        for asked in ("color", "kind", "size"):
            options += [(asked, shape, d) for d in _unique_descriptors(scene, shape, exclude=asked)]
    if not options:
        return None
    asked, shape, descriptor = _pick(rng, options)
    noun = {"color": "color", "kind": "shape", "size": "size"}[asked]
    return _qa("attribute", f"What {noun} is the {_phrase(shape, descriptor)}?", getattr(shape, asked))


def _counting_question(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    mode = ("all", "color", "kind")[int(rng.integers(3))]
    if mode == "all":
        return _qa("counting", "How many shapes are there?", str(len(scene.shapes)))
    attribute, vocabulary = ("color", list(COLORS)) if mode == "color" else ("kind", list(KINDS))
    present = sorted({getattr(s, attribute) for s in scene.shapes}, key=vocabulary.index)
    value = _pick(rng, present) if rng.random() < 0.8 else _pick(rng, vocabulary)  # sometimes an absent one: "0"
    count = sum(getattr(s, attribute) == value for s in scene.shapes)
    question = f"How many {value} shapes are there?" if mode == "color" else f"How many {PLURALS[value]} are there?"
    return _qa("counting", question, str(count))


_RELATIONS = {  # word -> (axis attribute, sign): "a is <word> b" iff sign * (a.axis - b.axis) < 0
    "to the left of": ("col", 1), "to the right of": ("col", -1), "above": ("row", 1), "below": ("row", -1),
}


def _spatial_question(scene: Scene, rng: np.random.Generator) -> dict[str, str] | None:
    described = [(s, _unique_descriptors(scene, s)) for s in scene.shapes]
    described = [(s, ds) for s, ds in described if ds]
    if not described:
        return None
    pairs = [(a, b) for a in described for b in described if a[0] is not b[0]]
    if not pairs or rng.random() < 0.5:
        shape, descriptors = _pick(rng, described)
        return _qa("spatial", f"Where is the {_phrase(shape, _pick(rng, descriptors))}?", shape.position)
    (a, a_ds), (b, b_ds) = _pick(rng, pairs)
    # only relations along an axis where the two cells differ: "is A left of B" with A above B is undefined
    relations = [w for w, (axis, _) in _RELATIONS.items() if getattr(a, axis) != getattr(b, axis)]
    word = _pick(rng, relations)
    axis, sign = _RELATIONS[word]
    answer = "yes" if sign * (getattr(a, axis) - getattr(b, axis)) < 0 else "no"
    question = f"Is the {_phrase(a, _pick(rng, a_ds))} {word} the {_phrase(b, _pick(rng, b_ds))}?"
    return _qa("spatial", question, answer)


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """At most one question per category (attribute, counting, spatial, reading); existence is separate."""
    questions = [_attribute_question(scene, rng), _counting_question(scene, rng), _spatial_question(scene, rng)]
    if scene.word is not None:
        questions.append(_qa("reading", "What word is written in the image?", scene.word.lower()))
    return [q for q in questions if q is not None]


# ---------------------------------------------------------------------------------------------------------------
# Existence questions, POPE-style (RUCAIBox/POPE main.py/utils.py): positives are objects in the image, negatives are
# drawn from the object vocabulary by one of three samplers over statistics measured on the generated set.


@dataclass(frozen=True)
class PopeStats:
    frequency: dict[str, int]  # object -> number of scene images containing it
    co_occurrence: dict[str, dict[str, int]]  # object -> other object -> number of images containing both


def pope_statistics(scenes: Iterable[Scene]) -> PopeStats:
    frequency: Counter[str] = Counter()
    co: dict[str, Counter[str]] = {o: Counter() for o in OBJECTS}
    for scene in scenes:
        present = {s.name for s in scene.shapes}
        frequency.update(present)
        for a in present:
            co[a].update(present - {a})
    return PopeStats(
        frequency={o: frequency[o] for o in OBJECTS},
        co_occurrence={a: {b: co[a][b] for b in OBJECTS} for a in OBJECTS},
    )


def _owed_choice(options: Sequence[str], answer: str, balance: Counter[str], rng: np.random.Generator) -> str:
    """One of `options` for a question answered `answer` that brings `balance` (name -> times asked present minus
    times asked absent; not changed here) back towards zero: yes asks a least-owed name, no a most-owed one."""
    owed = [balance[o] for o in options]
    target = min(owed) if answer == "yes" else max(owed)
    return _pick(rng, [o for o, b in zip(options, owed) if b == target])


def _pope_negative(split: str, positive: str, excluded: set[str], stats: PopeStats, rng: np.random.Generator,
                   balance: Counter[str] | None = None) -> str:
    candidates = [o for o in OBJECTS if o not in excluded]
    if split == "popular":
        counts = stats.frequency
    elif split == "adversarial":
        counts = stats.co_occurrence[positive]
    elif split == "random":
        counts = None
    elif split == BALANCED:
        if balance is None:
            raise ValueError(f"the {BALANCED!r} sampler needs the running balance of asked objects")
        return _owed_choice(candidates, "no", balance, rng)  # asked present most often more than asked absent
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS + (BALANCED,)}")
    if counts is not None and max(counts[o] for o in candidates) > 0:
        return max(candidates, key=lambda o: counts[o])  # max keeps the first of ties: vocabulary order
    return _pick(rng, candidates)  # POPE falls back to random when the statistics rank nothing


def existence_questions(
    scene: Scene, stats: PopeStats, split: str, rng: np.random.Generator, pairs: int = EXISTENCE_PAIRS,
    balance: Counter[str] | None = None,
) -> list[dict[str, str]]:
    """Alternating yes/no questions "Is there a <color> <kind> in the image?", balanced exactly per image.

    `balance` (for split BALANCED, updated in place): object -> times asked present minus times asked absent.
    """
    present = sorted({s.name for s in scene.shapes}, key=OBJECTS.index)
    positives = [present[i] for i in rng.permutation(len(present))[:pairs]]
    asked = set(present)  # never a negative that is in the image, never the same object twice
    questions = []
    for positive in positives:
        if balance is not None:
            balance[positive] += 1
        negative = _pope_negative(split, positive, asked, stats, rng, balance)
        if balance is not None:
            balance[negative] -= 1
        asked.add(negative)
        for obj, answer in ((positive, "yes"), (negative, "no")):
            questions.append(_qa("existence", f"Is there {_article(obj)} in the image?", answer, pope_split=split))
    return questions


# Existence drills: extra train-split files for a curriculum (written beside the instruction data, used by the eve
# recipe). A tiny model trained on the colour-and-kind questions alone sits on a loss plateau: it answers them all
# alike, not even checking colours, for 1,200 steps. Asked "is there anything red?" first, it learns to check
# colours, carries that over to the colour-and-kind wording, and then learns from it (measurements: docs/experiments.md,
# "Existence sits on a loss plateau that a colour check alone escapes").
# - colour_train.json: "Is there anything <colour> in the image?", one yes and one no per train scene.
# - existence_train.json: "Is there a <colour> <kind> in the image?", EXISTENCE_DRILLS per train scene (fewer for
#   scenes with fewer objects), each answered yes or no at random: not one of each per image, so that nothing can
#   be read off the image's other question.
# - instruct_train_no_existence.json: instruct.json without its existence questions, to mix with the above.
# The existence drills keep every object asked present as often as absent (greedy, like the balanced negatives); the
# colour drills do not (see colour_questions).
COLOUR_QUESTION = "Is there anything {} in the image?"
EXISTENCE_DRILLS = 2


def colour_questions(scene: Scene, rng: np.random.Generator, frequency: dict[str, int]) -> list[dict[str, str]]:
    """A yes and a no "Is there anything <colour> in the image?" (only the yes if every colour is present).

    Not name-balanced, on purpose: the yes asks a present colour drawn uniformly, the no an absent colour drawn with
    probability proportional to 1 / frequency² (`frequency`: colour -> train scenes containing it), so a common
    colour is asked present more often than absent and a rare one the other way (the colour word alone then answers
    67% of the quickstart's questions). That prior is what first pulls the answer to the colour word, and from there
    to the image: with every colour asked yes as often as no the loss sat on its plateau for all 300-400 steps; with
    a 58% prior it left it in one model at step ~200 and not in another by step 400; with this 67% prior it left it
    at step ~150 and the colour check reached AUC 0.90 (docs/experiments.md, "Existence learnt in the quickstart")."""
    present = sorted({s.color for s in scene.shapes}, key=list(COLORS).index)
    absent = [c for c in COLORS if c not in present]
    questions = [_qa("existence", COLOUR_QUESTION.format(_pick(rng, present)), "yes", drill="colour")]
    if absent:
        weights = np.array([1.0 / max(frequency.get(c, 0), 1) ** 2 for c in absent])
        no = absent[int(rng.choice(len(absent), p=weights / weights.sum()))]
        questions.append(_qa("existence", COLOUR_QUESTION.format(no), "no", drill="colour"))
    return questions


def independent_existence_questions(scene: Scene, rng: np.random.Generator, balance: Counter[str],
                                    count: int = EXISTENCE_DRILLS) -> list[dict[str, str]]:
    """Colour-and-kind questions on different objects, each answered yes or no with probability 1/2 independently:
    `count` of them, fewer when the scene has fewer distinct objects (so that "yes" is always possible: two
    questions on a one-object scene could not both be yes, and a forced "no" would tie the answers together)."""
    present = [o for o in OBJECTS if o in {s.name for s in scene.shapes}]
    absent = [o for o in OBJECTS if o not in present]
    questions = []
    for _ in range(min(count, len(present))):
        answer = "yes" if rng.random() < 0.5 else "no"
        pool = present if answer == "yes" else absent
        obj = _owed_choice(pool, answer, balance, rng)
        balance[obj] += 1 if answer == "yes" else -1
        pool.remove(obj)
        questions.append(_qa("existence", f"Is there {_article(obj)} in the image?", answer, drill="existence"))
    return questions


# ---------------------------------------------------------------------------------------------------------------
# Mazes


@dataclass(frozen=True)
class Maze:
    image_size: int
    cells: int  # cells per side
    passages: tuple[tuple[int, int, int, int], ...]  # open walls (r1, c1, r2, c2), neighbours, sorted
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]

    @property
    def built_loops(self) -> int:  # independent cycles by construction: a spanning tree has cells^2 - 1 edges
        return len(self.passages) - (self.cells * self.cells - 1)


@dataclass(frozen=True)
class MazeTopology:
    nodes: int  # free cells
    edges: int  # free wall midpoints between two free cells
    components: int
    loops: int  # edges - nodes + components: independent cycles (holes in the free space)


def maze_geometry(image_size: int, cells: int) -> tuple[int, int]:
    """(unit, margin): the maze is a (2*cells+1)^2 grid of unit x unit blocks, centred with `margin` pixels."""
    units = 2 * cells + 1
    unit = image_size // units
    if unit < 1:
        raise ValueError(f"a {cells}x{cells} maze does not fit in {image_size} pixels")
    return unit, (image_size - unit * units) // 2


def _interior_walls(cells: int) -> list[tuple[int, int, int, int]]:
    walls = []
    for r in range(cells):
        for c in range(cells):
            if c + 1 < cells:
                walls.append((r, c, r, c + 1))
            if r + 1 < cells:
                walls.append((r, c, r + 1, c))
    return walls


def sample_maze(seed: int, index: int, image_size: int, loops: bool,
                cells_range: tuple[int, int] = MAZE_CELLS) -> Maze:
    """A perfect maze (randomised depth-first search) or, with `loops`, one with 1-3 extra opened walls; its side
    is drawn from `cells_range` (inclusive), capped so that every wall/cell block is at least 3 pixels."""
    rng = np.random.default_rng([seed, index, _MAZE])
    max_cells = max(2, (image_size // 3 - 1) // 2)  # at least 3 pixels per wall/cell block
    cells = int(rng.integers(cells_range[0], cells_range[1] + 1))
    cells = min(cells, max_cells)
    visited = np.zeros((cells, cells), dtype=bool)
    passages: set[tuple[int, int, int, int]] = set()
    start = (int(rng.integers(cells)), int(rng.integers(cells)))
    stack = [start]
    visited[start] = True
    while stack:
        r, c = stack[-1]
        neighbours = [
            (r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= r + dr < cells and 0 <= c + dc < cells and not visited[r + dr, c + dc]
        ]
        if not neighbours:
            stack.pop()
            continue
        nxt = neighbours[int(rng.integers(len(neighbours)))]
        visited[nxt] = True
        (r1, c1), (r2, c2) = sorted(((r, c), nxt))
        passages.add((r1, c1, r2, c2))
        stack.append(nxt)
    if loops:
        closed = [w for w in _interior_walls(cells) if w not in passages]
        k = min(len(closed), int(rng.integers(MAZE_EXTRA_PASSAGES[0], MAZE_EXTRA_PASSAGES[1] + 1)))
        passages.update(closed[i] for i in rng.choice(len(closed), size=k, replace=False))
    wall, floor = MAZE_STYLES[int(rng.integers(len(MAZE_STYLES)))]
    return Maze(image_size=image_size, cells=cells, passages=tuple(sorted(passages)), wall=wall, floor=floor)


def render_maze(maze: Maze) -> Image.Image:
    units = 2 * maze.cells + 1
    free = np.zeros((units, units), dtype=bool)  # (units, units), True = floor
    free[1::2, 1::2] = True  # every cell
    for r1, c1, r2, c2 in maze.passages:
        free[r1 + r2 + 1, c1 + c2 + 1] = True  # the wall block between two neighbouring cells
    unit, margin = maze_geometry(maze.image_size, maze.cells)
    blocks = np.kron(free, np.ones((unit, unit), dtype=bool))  # (units*unit, units*unit)
    pixels = np.empty((maze.image_size, maze.image_size, 3), dtype=np.uint8)
    pixels[:] = maze.floor
    inner = pixels[margin:margin + blocks.shape[0], margin:margin + blocks.shape[1]]
    inner[blocks] = maze.floor
    inner[~blocks] = maze.wall
    return Image.fromarray(pixels, mode="RGB")


def maze_topology(image: Image.Image, cells: int) -> MazeTopology:
    """Read the passage graph back from the pixels and count its independent loops.

    A block (cell or wall midpoint) is free when its mean luminance is above mid-grey. Nodes are free cells, edges
    are free wall blocks between two free cells; loops = E - V + C (first Betti number of the free space).
    """
    unit, margin = maze_geometry(image.size[0], cells)
    units = 2 * cells + 1
    luma = np.asarray(image.convert("L"), dtype=np.float64)
    luma = luma[margin:margin + units * unit, margin:margin + units * unit]
    block_mean = luma.reshape(units, unit, units, unit).mean(axis=(1, 3))  # (units, units)
    free = block_mean > 127.5
    parent = list(range(cells * cells))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    nodes = {r * cells + c for r in range(cells) for c in range(cells) if free[2 * r + 1, 2 * c + 1]}
    edges = 0
    for r1, c1, r2, c2 in _interior_walls(cells):
        a, b = r1 * cells + c1, r2 * cells + c2
        if a in nodes and b in nodes and free[r1 + r2 + 1, c1 + c2 + 1]:
            edges += 1
            parent[find(a)] = find(b)
    components = len({find(i) for i in nodes})
    return MazeTopology(nodes=len(nodes), edges=edges, components=components, loops=edges - len(nodes) + components)


def maze_caption(maze: Maze, topology: MazeTopology) -> str:
    return f"a maze of {maze.cells} by {maze.cells} cells with {'loops' if topology.loops else 'no loops'}."


def maze_questions(topology: MazeTopology) -> list[dict[str, str]]:
    return [_qa("maze", "Does this maze have a loop?", "yes" if topology.loops > 0 else "no")]


# ---------------------------------------------------------------------------------------------------------------
# Dense per-pixel labels, read back from a scenes.json record and its image (the ViT teacher's pre-training targets)

COLOUR_CLASSES: tuple[str, ...] = ("none", *COLORS)
KIND_CLASSES: tuple[str, ...] = ("background", *KINDS, "text", "wall")  # text: the word's strokes; wall: maze walls
WORD_CLASSES: tuple[str, ...] = ("none", *WORDS)
TEXT_CONTRAST = 100  # grey levels from the background's nominal level: text is far (>150), gradients + noise near (<80)


def pixel_labels(record: dict[str, Any], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour ids, kind ids), each (H, W) int64 indices into COLOUR_CLASSES / KIND_CLASSES, for one scenes.json
    record and its decoded image (H, W, 3).

    Shapes: pixels inside the shape's box [cx ± r] × [cy ± r] that have exactly its palette colour — exact, since
    shapes are drawn without antialiasing, never touch, and backgrounds and text are grey. Text: pixels of the word's
    row band far from the background grey. Maze walls: the block grid rebuilt from `cells` and `passages`.
    """
    height, width = image.shape[:2]
    colour = np.zeros((height, width), dtype=np.int64)
    kind = np.zeros((height, width), dtype=np.int64)
    if record["type"] == "maze":
        cells = record["cells"]
        units = 2 * cells + 1
        free = np.zeros((units, units), dtype=bool)
        free[1::2, 1::2] = True
        for r1, c1, r2, c2 in record["passages"]:
            free[r1 + r2 + 1, c1 + c2 + 1] = True
        unit, margin = maze_geometry(width, cells)
        walls = np.kron(~free, np.ones((unit, unit), dtype=bool))
        kind[margin:margin + walls.shape[0], margin:margin + walls.shape[1]][walls] = KIND_CLASSES.index("wall")
        return colour, kind
    ys, xs = np.mgrid[0:height, 0:width]
    for shape in record["shapes"]:
        cx, cy, r = shape["cx"], shape["cy"], shape["r"]
        inside = (abs(xs - cx) <= r) & (abs(ys - cy) <= r) & (image == COLORS[shape["color"]]).all(axis=-1)
        colour[inside] = COLOUR_CLASSES.index(shape["color"])
        kind[inside] = KIND_CLASSES.index(shape["kind"])
    if record.get("word"):
        top, bottom = (round(k * height / GRID) for k in (record["word_row"], record["word_row"] + 1))
        level = BACKGROUNDS[record["background"]["color"]]
        band = np.zeros((height, width), dtype=bool)
        band[top:bottom] = True
        kind[band & (np.abs(image.astype(np.int64).mean(-1) - level) > TEXT_CONTRAST)] = KIND_CLASSES.index("text")
    return colour, kind


# ---------------------------------------------------------------------------------------------------------------
# The dataset


def _weyl(index: int, alpha: float, offset: float, fraction: float) -> bool:
    # a low-discrepancy Bernoulli: any prefix of length n holds n * fraction hits to within O(log n)
    return (offset + (index + 1) * alpha) % 1.0 < fraction


def _save_png(image: Image.Image, path: Path) -> None:
    # no pnginfo, no dpi, fixed compression: the bytes are a function of the pixels (and the zlib version)
    image.save(path, format="PNG", optimize=False, compress_level=6)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, sort_keys=True, indent=1, ensure_ascii=True)
        f.write("\n")


def _llava_qa(entry_id: str, image: str, qa: dict[str, str]) -> dict[str, Any]:
    return {
        "id": entry_id,
        "image": image,
        **qa,
        "conversations": [
            {"from": "human", "value": "<image>\n" + qa["question"]},
            {"from": "gpt", "value": qa["answer"]},
        ],
    }


def _scene_record(scene: Scene) -> dict[str, Any]:
    return {
        "type": "scene",
        "background": {k: v for k, v in vars(scene.background).items() if v is not None},
        "shapes": [
            {**vars(s), "position": s.position} for s in scene.shapes
        ],
        "word": scene.word,
        "word_row": scene.word_row,
    }


def _maze_record(maze: Maze, topology: MazeTopology) -> dict[str, Any]:
    return {
        "type": "maze",
        "cells": maze.cells,
        "passages": [list(p) for p in maze.passages],
        "built_loops": maze.built_loops,
        "pixel_topology": vars(topology),
    }


def _validate(n: int, seed: int, image_size: int, test_fraction: float, maze_fraction: float,
              maze_cells: tuple[int, int], train_negatives: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= 4096:
        raise ValueError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, 4096], got {image_size!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if not 0.0 <= maze_fraction <= 1.0:
        raise ValueError(f"maze_fraction must be in [0, 1], got {maze_fraction!r}")
    if (not isinstance(maze_cells, (tuple, list)) or len(maze_cells) != 2
            or not all(isinstance(c, int) for c in maze_cells)
            or not 2 <= maze_cells[0] <= maze_cells[1]):
        raise ValueError(f"maze_cells must be (smallest, largest) cells per side with 2 <= smallest <= largest, "
                         f"got {maze_cells!r}")
    if train_negatives not in TRAIN_NEGATIVES:
        raise ValueError(f"train_negatives must be one of {TRAIN_NEGATIVES}, got {train_negatives!r}")


def synthesize(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    test_fraction: float = 0.2,
    maze_fraction: float = 0.2,
    progress: bool = True,
    maze_cells: tuple[int, int] = MAZE_CELLS,
    train_negatives: str = POPE,
) -> dict[str, Any]:
    """Write n images plus LLaVA-format captions and questions under out_dir; return (and write) the summary.

    `maze_cells`: (smallest, largest) cells per side of a maze, inclusive (capped by the image size).
    `train_negatives`: "pope" or "balanced", how the train split's existence negatives are drawn (TRAIN_NEGATIVES).
    Files are byte-identical for equal arguments. Existing files of the same names are overwritten.
    """
    _validate(n, seed, image_size, test_fraction, maze_fraction, maze_cells, train_negatives)
    maze_cells = (maze_cells[0], maze_cells[1])
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    offsets = np.random.default_rng([seed, _PLAN]).random(3)
    digits = max(6, len(str(n - 1)))

    records: list[dict[str, Any]] = []  # per image: id, image path, split, scene/maze, questions
    scenes: dict[int, Scene] = {}
    mazes_so_far = {"train": 0, "test": 0}
    for index in tqdm(range(n), desc="synthesize", unit="img", disable=not progress):
        stem = f"{index:0{digits}d}"
        record: dict[str, Any] = {
            "id": stem,
            "image": f"images/{stem}.png",
            "split": "test" if _weyl(index, _ALPHA_TEST, offsets[0], test_fraction) else "train",
        }
        if _weyl(index, _ALPHA_MAZE, offsets[1], maze_fraction):
            # alternate within each split: loop / no-loop answers are balanced to within one per split and prefix
            loops = (mazes_so_far[record["split"]] + int(offsets[2] < 0.5)) % 2 == 1
            mazes_so_far[record["split"]] += 1
            maze = sample_maze(seed, index, image_size, loops=loops, cells_range=maze_cells)
            image = render_maze(maze)
            topology = maze_topology(image, maze.cells)  # the label comes from the pixels ...
            if topology.loops != maze.built_loops or topology.components != 1:  # ... and must match the build
                raise RuntimeError(f"maze {stem}: pixels read {topology}, built {maze.built_loops} loops")
            record.update(_maze_record(maze, topology))
            record["caption"] = maze_caption(maze, topology)
            record["questions"] = maze_questions(topology)
        else:
            scene = sample_scene(seed, index, image_size)
            scenes[index] = scene
            image = render_scene(scene)
            record.update(_scene_record(scene))
            record["caption"] = scene_caption(scene)
            record["questions"] = scene_questions(scene, np.random.default_rng([seed, index, _QUESTIONS]))
        _save_png(image, out / record["image"])
        records.append(record)

    # Existence needs dataset-wide statistics, hence a second pass (as POPE measures them on its image set).
    stats = pope_statistics(scenes.values())
    balance: Counter[str] = Counter()  # train negatives: object -> times asked present minus times asked absent
    for index, scene in scenes.items():
        rng = np.random.default_rng([seed, index, _EXISTENCE])
        split = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))]
        if records[index]["split"] == "train" and train_negatives == BALANCED:
            records[index]["questions"] += existence_questions(scene, stats, BALANCED, rng, balance=balance)
        else:
            records[index]["questions"] += existence_questions(scene, stats, split, rng)

    drills: dict[str, list[dict[str, Any]]] = {"colour": [], "existence": []}  # train scenes only (see above)
    object_balance: Counter[str] = Counter()
    colour_frequency = Counter(c for index, scene in scenes.items() if records[index]["split"] == "train"
                               for c in {s.color for s in scene.shapes})
    for index, scene in scenes.items():
        if records[index]["split"] != "train":
            continue
        rng = np.random.default_rng([seed, index, _DRILLS])
        for kind, questions in (("colour", colour_questions(scene, rng, colour_frequency)),
                                ("existence", independent_existence_questions(scene, rng, object_balance))):
            drills[kind] += [_llava_qa(f"{records[index]['id']}_{kind[0]}{k}", records[index]["image"], qa)
                             for k, qa in enumerate(questions)]

    pretrain, instruct = [], {"train": [], "test": []}
    for record in records:
        if record["split"] == "train":
            pretrain.append({
                "id": record["id"],
                "image": record["image"],
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": record["caption"]}],
            })
        for k, qa in enumerate(record["questions"]):
            instruct[record["split"]].append(_llava_qa(f"{record['id']}_{k}", record["image"], qa))

    summary = _summary(records, instruct, len(pretrain), n, seed, image_size, test_fraction, maze_fraction,
                       maze_cells, train_negatives)
    summary["drills"] = {f"{kind}_train": {"questions": len(rows),
                                           "answers": dict(sorted(Counter(r["answer"] for r in rows).items()))}
                         for kind, rows in drills.items()}
    _write_json(out / "captions.json", pretrain)
    _write_json(out / "instruct.json", instruct["train"])
    _write_json(out / "instruct_test.json", instruct["test"])
    _write_json(out / "colour_train.json", drills["colour"])
    _write_json(out / "existence_train.json", drills["existence"])
    # the instruction data without its existence questions, for a recipe that gives existence as the drills instead
    _write_json(out / "instruct_train_no_existence.json", [e for e in instruct["train"] if e["category"] != "existence"])
    _write_json(out / "scenes.json", [{k: v for k, v in r.items() if k != "questions"} for r in records])
    _write_json(out / "summary.json", summary)
    return summary


def _summary(
    records: list[dict[str, Any]],
    instruct: dict[str, list[dict[str, Any]]],
    n_pretrain: int,
    n: int,
    seed: int,
    image_size: int,
    test_fraction: float,
    maze_fraction: float,
    maze_cells: tuple[int, int],
    train_negatives: str,
) -> dict[str, Any]:
    def split_counts(entries: list[dict[str, Any]]) -> dict[str, Any]:
        pope: dict[str, Counter[str]] = {}
        for e in entries:
            if e["category"] == "existence":
                pope.setdefault(e["pope_split"], Counter())[e["answer"]] += 1
        return {
            "questions": len(entries),
            "categories": {c: sum(e["category"] == c for e in entries) for c in CATEGORIES},
            "answers": {c: dict(sorted(Counter(e["answer"] for e in entries if e["category"] == c).items()))
                        for c in CATEGORIES},
            "pope": {s: {"yes": pope[s]["yes"], "no": pope[s]["no"]} for s in POPE_SPLITS + (BALANCED,)
                     if s in pope},
        }

    images = Counter((r["split"], r["type"]) for r in records)
    return {
        "format": DATA_FORMAT,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "test_fraction": test_fraction,
        "maze_fraction": maze_fraction,
        "maze_cells": list(maze_cells),
        "train_negatives": train_negatives,
        "images": {s: {"scene": images[(s, "scene")], "maze": images[(s, "maze")]} for s in ("train", "test")},
        "pretrain": n_pretrain,
        "instruct_train": split_counts(instruct["train"]),
        "instruct_test": split_counts(instruct["test"]),
    }
