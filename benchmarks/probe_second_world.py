"""Linear probe on the second world: does a visual token at a shape's centre cell say the shape's kind and colour?

The scenes of the first N training images are drawn again from the generator's seeded streams (the same scenes
`second_world.py --seed 0` wrote). For a trained model (a folder with config.json) the probe reads its patch stem's
output (EVE's embedder), the embedder's output and the hidden state after decoder block 2 at each shape's centre
cell; for an align teacher (RUN/teacher, a folder with vit.json) the teacher's patch features there, the align
loss's targets. It fits a linear classifier on 80% of the shapes and scores the other 20% (beside the most frequent
class's share): what one attention layer can read off a token (its keys and values are linear in it).

    python benchmarks/probe_second_world.py RUN/final 1200 --images /tmp/world2/images
    python benchmarks/probe_second_world.py RUN/teacher 1200 --images /tmp/world2/images
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from second_world import _SCENE, COLOURS, KINDS, SPLITS, sample_scene  # noqa: E402
from monovlm.config import VisionConfig  # noqa: E402
from monovlm.data.images import image_to_tensor, load_image  # noqa: E402
from monovlm.data.layout import TokenLayout  # noqa: E402
from monovlm.model.align import HiddenCapture  # noqa: E402
from monovlm.model.vit import load_vit  # noqa: E402
from monovlm.model.vlm import EncoderFreeVLM  # noqa: E402


def model_grids(folder: Path):
    """A function image tensor -> {name: (rows, cols, C)} for a trained model: its conv stem's output (EVE's
    embedder), the embedder's output and block 2's."""
    model = EncoderFreeVLM.load(folder).eval()
    vision = model.config.vision

    def grids(image: torch.Tensor) -> dict[str, torch.Tensor]:
        layout = TokenLayout.for_image(image, vision)
        ids = torch.full((1, layout.num_tokens), model.image_token_id)
        x, _ = model.embed(ids, [image])
        with HiddenCapture(model.decoder, [2]) as captured:
            model.hidden_states(ids, [image], torch.ones_like(ids))
        shape = (layout.rows, layout.cols, -1)
        stem = getattr(model.embedder, "stem", None)  # the EVE embedder's conv stem, before its context and MLP
        found = {"stem": stem(image[None])[0].permute(1, 2, 0)} if stem is not None else {}
        return {**found, "embedder": x[0][layout.patch_index].view(shape),
                "layer2": captured.states[0][0][layout.patch_index].view(shape)}
    return vision, grids


def teacher_grids(folder: Path):
    """The same for a "vit" align teacher: its patch features (rows, cols, W)."""
    vit = load_vit(folder).eval()
    return lambda image: {"teacher": vit.features([image])[0]}


def probe(features: list[torch.Tensor], labels: list[int], classes: int) -> tuple[float, float]:
    """(held-out accuracy %, most frequent class's share %) of a linear classifier fitted on the first 80%."""
    x = torch.stack(features).float()
    y = torch.tensor(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = int(0.8 * len(y))
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * w.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = ((x[cut:] @ w + b).argmax(1) == y[cut:]).float().mean().item()
    majority = torch.bincount(y[cut:]).max().item() / (len(y) - cut)
    return round(100 * accuracy, 1), round(100 * majority, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a trained model folder (RUN/final) or a teacher (RUN/teacher)")
    parser.add_argument("images", type=int, help="how many of the first training images")
    parser.add_argument("--images", dest="image_dir", type=Path, default=Path("/tmp/world2/images"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if (args.folder / "vit.json").is_file():
        vision = VisionConfig(patch_size=8, max_pixels=4096)  # the second world's 64×64 images, as eve-vqa reads them
        grids = teacher_grids(args.folder)
    else:
        vision, grids = model_grids(args.folder)
    features: dict[str, list[torch.Tensor]] = {}
    kinds, colours = [], []
    with torch.no_grad():
        for i in range(args.images):
            scene = sample_scene(np.random.default_rng([0, SPLITS["train"], i, _SCENE]), 64)
            image = image_to_tensor(load_image(args.image_dir / f"train_{i:05d}.png"), vision)
            by_name = grids(image)
            for shape in scene.shapes:
                for name, grid in by_name.items():
                    rows, cols = grid.shape[:2]
                    r, c = min(int(shape.cy * rows / 64), rows - 1), min(int(shape.cx * cols / 64), cols - 1)
                    features.setdefault(name, []).append(grid[r, c])
                kinds.append(KINDS.index(shape.kind))
                colours.append(list(COLOURS).index(shape.colour))
    for name, found in features.items():
        print(args.folder, name, "kind", probe(found, kinds, len(KINDS)), "colour",
              probe(found, colours, len(COLOURS)), "shapes", len(kinds))


if __name__ == "__main__":
    main()
