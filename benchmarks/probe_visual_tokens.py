"""Which object attributes a model's visual tokens carry: an MLP probe per depth, on held-out shapes.

For every shape of the synthetic scenes (`monovlm data synth`), take the visual token at the shape's centre (or the
3×3 tokens around it, `--neighbourhood`) at the embedder output and after each decoder layer, train a small MLP
(one hidden layer of 256) on the shapes of train-split images to predict the shape's kind and colour, and report its
accuracy on the shapes of test-split images beside the majority-class prior. `--pixels` probes the raw pixels around
each centre instead, the ceiling: what the image itself gives away. `--teacher RUN/teacher` probes the align loss's
target: the features of the ViT teacher a run trained (the patch at each centre; images prepared as for `--model`).
`--linear` probes with a linear classifier instead of the MLP: what a decoder can read off a token in one step
(attention's values and the align head are linear in it).

    python benchmarks/probe_visual_tokens.py --model default --data runs/quickstart/data
    python benchmarks/probe_visual_tokens.py --model default --data runs/quickstart/data --neighbourhood
    python benchmarks/probe_visual_tokens.py --data runs/quickstart/data --pixels 10
    python benchmarks/probe_visual_tokens.py --data runs/quickstart/data --teacher runs/quickstart/run/teacher

The prompt is the image and "Describe the image." (no question), so decoder depths show what the image tokens hold
before any question asks for it. Colour is one token's pixels; kind needs a shape's boundary, which spans tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from monovlm.data import synthetic as syn

ATTRIBUTES = {"kind": list(syn.KINDS), "color": list(syn.COLORS)}


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, is_test: torch.Tensor, steps: int = 300,
                   linear: bool = False) -> float:
    """Train a one-hidden-layer MLP (or, `linear`, a linear classifier) on the train rows of features (N, D) ->
    labels (N,); accuracy on the test rows."""
    train = ~is_test
    mean, std = features[train].mean(0), features[train].std(0) + 1e-5
    x = (features - mean) / std
    torch.manual_seed(0)
    classes = int(labels.max()) + 1
    if linear:
        net = torch.nn.Linear(x.shape[1], classes)
    else:
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):  # full batch: a few thousand shapes
        loss = F.cross_entropy(net(x[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (net(x[is_test]).argmax(-1) == labels[is_test]).float().mean().item()


def token_features(model_path: str, data: Path, scenes: list[dict], neighbourhood: bool):
    """Per shape: a list over depths (embedder output, then after each decoder layer) of its token feature."""
    from monovlm.data.processor import Processor
    from monovlm.eval.run import resolve_model
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.tokenizer import Tokenizer

    folder = resolve_model(model_path)
    model, tokenizer = EncoderFreeVLM.load(folder).eval(), Tokenizer.from_folder(folder)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.decoder.layers]
    offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)] if neighbourhood else [(0, 0)]
    per_shape: list[list[torch.Tensor]] = []
    try:
        with torch.no_grad():
            for scene in scenes:
                ids, tensors = processor.prompt("Describe the image.", [processor.load(data / scene["image"])])
                input_ids = torch.tensor([ids])
                captured.clear()
                embeds, _ = model.embed(input_ids, tensors)  # (1, T, C)
                model.hidden_states(input_ids, tensors)
                depths = [embeds[0]] + [h[0] for h in captured]  # each (T, C)
                layout = model.visual_layout(input_ids, tensors)
                rows, cols = layout.grids[0]
                slot = {(int(layout.grid_row[0, t]), int(layout.grid_col[0, t])): t
                        for t in layout.patch_mask[0].nonzero().flatten().tolist()}
                height, width = tensors[0].shape[-2:]
                for shape in scene["shapes"]:
                    row, col = shape["cy"] * rows // height, shape["cx"] * cols // width
                    tokens = [slot.get((row + a, col + b)) for a, b in offsets]
                    per_shape.append([torch.cat([d[t] if t is not None else torch.zeros_like(d[0]) for t in tokens])
                                      for d in depths])
    finally:
        for hook in hooks:
            hook.remove()
    names = ["embedder"] + [f"layer {k + 1}" for k in range(len(per_shape[0]) - 1)]
    return names, [torch.stack([shape[k] for shape in per_shape]).float() for k in range(len(names))]


def teacher_features(teacher_folder: Path, model_path: str, data: Path, scenes: list[dict]):
    from monovlm.data.images import image_to_tensor, load_image
    from monovlm.eval.run import resolve_model
    from monovlm.model.teachers import ViTTeacher
    from monovlm.model.vit import load_vit
    from monovlm.model.vlm import EncoderFreeVLM

    vision = EncoderFreeVLM.load(resolve_model(model_path)).config.vision
    teacher = ViTTeacher(load_vit(teacher_folder))
    rows = []
    for scene in scenes:
        pixels = image_to_tensor(load_image(data / scene["image"]), vision)  # (3, H, W)
        grid = teacher([pixels])[0]  # (rows, cols, D)
        for shape in scene["shapes"]:
            rows.append(grid[shape["cy"] * grid.shape[0] // pixels.shape[1],
                             shape["cx"] * grid.shape[1] // pixels.shape[2]].float())
    return ["teacher"], [torch.stack(rows)]


def pixel_features(data: Path, scenes: list[dict], half: int) -> tuple[list[str], list[torch.Tensor]]:
    rows = []
    for scene in scenes:
        pixels = np.asarray(Image.open(data / scene["image"]).convert("RGB"), dtype=np.float32) / 255
        pixels = np.pad(pixels, ((half, half), (half, half), (0, 0)))
        for shape in scene["shapes"]:
            y, x = shape["cy"] + half, shape["cx"] + half
            rows.append(torch.from_numpy(pixels[y - half : y + half, x - half : x + half].reshape(-1)))
    return [f"pixels {2 * half}x{2 * half}"], [torch.stack(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' for the shipped model")
    parser.add_argument("--data", type=Path, required=True, help="a `monovlm data synth` folder")
    parser.add_argument("--scenes", type=int, default=1200, help="most scene images to read")
    parser.add_argument("--neighbourhood", action="store_true", help="the 3x3 tokens around each centre, concatenated")
    parser.add_argument("--pixels", type=int, default=0, help="probe raw pixels: half the window side (e.g. 10)")
    parser.add_argument("--teacher", type=Path, help="probe a ViT teacher folder (RUN/teacher) instead of the model")
    parser.add_argument("--linear", action="store_true", help="a linear probe instead of the one-hidden-layer MLP")
    args = parser.parse_args()

    records = json.loads((args.data / "scenes.json").read_text())
    scenes = [r for r in records if r["type"] == "scene"][: args.scenes]
    if not scenes:
        raise SystemExit(f"{args.data / 'scenes.json'} has no shape scenes")
    if args.pixels:
        names, features = pixel_features(args.data, scenes, args.pixels)
    elif args.teacher:
        names, features = teacher_features(args.teacher, args.model, args.data, scenes)
    else:
        names, features = token_features(args.model, args.data, scenes, args.neighbourhood)
    is_test = torch.tensor([scene["split"] == "test" for scene in scenes for _ in scene["shapes"]])
    print(f"{int((~is_test).sum())} train shapes, {int(is_test.sum())} test shapes; accuracy on the test shapes (%)")
    print("| attribute | prior | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for attribute, vocabulary in ATTRIBUTES.items():
        labels = torch.tensor([vocabulary.index(shape[attribute]) for scene in scenes for shape in scene["shapes"]])
        prior = (labels[is_test] == torch.bincount(labels[~is_test]).argmax()).float().mean().item()
        accuracies = [probe_accuracy(f, labels, is_test, linear=args.linear) for f in features]
        print(f"| {attribute} | {100 * prior:.1f} | " + " | ".join(f"{100 * a:.1f}" for a in accuracies) + " |")


if __name__ == "__main__":
    main()
