"""Where the answer looks: on the second world's colour questions about an image with two or more shapes ("What
colour is the ring?"), how much of the attention from the answer position (the prompt's last token) at each decoder
layer falls on the named shape's visual tokens, on the other shapes', on the rest of the image and on the text
(averaged over heads; beside what attention spread evenly over the grid would give).

A model that binds a colour to its shape must look up the named shape and read its colour there. If the attention
lands on the named shape but the answer is another shape's colour, the tokens mix their neighbours' attributes; if it
spreads over every shape, the lookup itself fails. Scenes come again from the generator (`second_world.sample_scene`
with the same seed), so nothing but the test images and `instruct_test.json` is read. A token belongs to a shape when
its cell's centre lies inside the shape's circumscribed circle.

    python benchmarks/answer_attention.py RUN/final --data /tmp/world2 --questions 300 [--teacher RUN/teacher]

With `--teacher` (a "qa" teacher pretrained with `[align] teacher_head = "lookup"`) a last row gives the same split
for where the teacher's lookup head looks (its attention over the patches, averaged over heads): look supervision's
target (`monovlm/train/look.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_world  # noqa: E402  benchmarks/second_world.py
from binding_errors import test_scene  # noqa: E402
from monovlm.data.images import load_image  # noqa: E402
from monovlm.data.layout import TokenLayout  # noqa: E402
from monovlm.data.processor import Processor  # noqa: E402
from monovlm.model.vit import load_vit  # noqa: E402
from monovlm.model.vlm import EncoderFreeVLM  # noqa: E402
from monovlm.tokenizer import Tokenizer  # noqa: E402
from monovlm.train.vit_qa import load_qa_head  # noqa: E402


def token_owners(scene: second_world.Scene, rows: int, cols: int, size: int) -> np.ndarray:
    """(rows, cols) int: the index of the shape whose circumscribed circle holds the cell's centre, -1 for none."""
    owners = np.full((rows, cols), -1)
    for r in range(rows):
        for c in range(cols):
            y, x = (r + 0.5) * size / rows, (c + 0.5) * size / cols
            for index, shape in enumerate(scene.shapes):
                if (x - shape.cx) ** 2 + (y - shape.cy) ** 2 <= shape.r ** 2:
                    owners[r, c] = index
    return owners


def answer_attention(model: EncoderFreeVLM, ids: torch.Tensor, images: list[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """(last-token logits (V,), (layers, heads, T): each layer's attention probabilities from the last token over
    the prompt), the queries and keys rebuilt from each attention layer's own inputs (its RoPE tables included)."""
    calls: list[tuple] = []
    hooks = [block.attn.register_forward_pre_hook(lambda _module, args: calls.append(args))
             for block in model.decoder.layers]
    try:
        logits = model(ids, images, last_only=True)[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    allowed = torch.ones(1, 1, 1, ids.shape[1], dtype=torch.bool)  # the last token sees the whole prompt
    for block, (x, inputs, *_rest) in zip(model.decoder.layers, calls):
        q, k, _ = block.attn.project_qkv(x, inputs.cos, inputs.sin, inputs.routing, inputs.hw)
        rows.append(block.attn.probabilities(q[:, :, -1:], k, allowed)[0, :, 0])  # (H, T)
    return logits, torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a trained model folder (RUN/final or a checkpoint)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/world2"), help="the second world's folder")
    parser.add_argument("--questions", type=int, default=300, help="colour questions about 2+ shapes to read")
    parser.add_argument("--seed", type=int, default=0, help="the second world's --seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", type=Path, help="also where this lookup-head teacher (RUN/teacher) looks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = EncoderFreeVLM.load(args.model).eval()
    tokenizer = Tokenizer.from_folder(args.model)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    look = None
    if args.teacher is not None:
        head, vocabulary = load_qa_head(args.teacher)
        look = (load_vit(args.teacher).eval(), head, vocabulary)
    records = [r for r in json.loads((args.data / "instruct_test.json").read_text()) if r.get("category") == "colour"]
    # (layer, outcome) -> summed attention mass on [named shape, other shapes, background, text], and per-token means
    mass: dict[tuple[int, str], np.ndarray] = defaultdict(lambda: np.zeros(4))
    counts: dict[str, int] = defaultdict(int)
    area = np.zeros(2)  # summed shares of the grid tokens on the named shape and on the others
    read = 0
    with torch.no_grad():
        for record in records:
            index = int(Path(record["image"]).stem.split("_")[-1])
            scene = test_scene(index, args.seed)
            if len(scene.shapes) < 2:
                continue
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            answer = record["conversations"][1]["value"].strip().lower()
            named = [i for i, shape in enumerate(scene.shapes) if shape.kind in question.lower()]
            if len(named) != 1:
                continue
            image = load_image(args.data / record["image"])
            ids, pixels = processor.prompt(question, [image])
            ids = torch.tensor([ids])
            logits, attention = answer_attention(model, ids, pixels)
            predicted = tokenizer.decode([int(logits.argmax())]).strip().lower()
            outcome = "right" if predicted and answer.startswith(predicted) else "wrong"
            attention = attention.mean(dim=1)  # (layers, T): over heads
            visual = (ids[0] == model.image_token_id).nonzero()[:, 0]  # grid tokens, and CLS / row ends if any
            layout = TokenLayout.for_image(pixels[0], model.config.vision)
            grid = visual[layout.patch_index]  # (rows·cols,) the grid tokens' positions, row-major
            owners = token_owners(scene, layout.rows, layout.cols, scene.size).reshape(-1)
            for layer, row in enumerate(attention.numpy()):
                on_grid = row[grid.numpy()]
                split = np.array([on_grid[owners == named[0]].sum(),
                                  on_grid[(owners >= 0) & (owners != named[0])].sum(),
                                  row[visual.numpy()].sum() - on_grid[owners >= 0].sum(),
                                  row.sum() - row[visual.numpy()].sum()])
                for key in (outcome, "all"):
                    mass[(layer, key)] += split
            area[0] += (owners == named[0]).mean()
            area[1] += ((owners >= 0) & (owners != named[0])).mean()
            if look is not None:  # the teacher's lookup head on the same question: row "teacher"
                vit, head, vocabulary = look
                features = vit.features(pixels)[0].flatten(0, 1)[None]  # (1, N, W)
                teacher_map = head.look(features, *vocabulary.encode([question]))[0].numpy()  # (N,)
                mass[("teacher", "all")] += np.array([teacher_map[owners == named[0]].sum(),
                                                      teacher_map[(owners >= 0) & (owners != named[0])].sum(),
                                                      teacher_map[owners < 0].sum(), 0.0])
            for key in (outcome, "all"):
                counts[key] += 1
            read += 1
            if read >= args.questions:
                break
    print(f"{args.model}: {read} colour questions about images with 2+ shapes ({counts['right']} right)")
    print(f"(uniform attention over the grid: {100 * area[0] / max(read, 1):.1f}% on the named shape, "
          f"{100 * area[1] / max(read, 1):.1f}% on the others)")
    print("| layer | answers | named shape | other shapes | background | text |")
    print("|---|---|---:|---:|---:|---:|")
    for layer in range(len(model.decoder.layers)):
        for key in ("all", "right", "wrong"):
            if counts[key]:
                share = 100 * mass[(layer, key)] / counts[key]
                print(f"| {layer} | {key} ({counts[key]}) | " + " | ".join(f"{v:.1f}" for v in share) + " |")
    if look is not None:
        share = 100 * mass[("teacher", "all")] / max(read, 1)
        print(f"| teacher | all ({read}) | " + " | ".join(f"{v:.1f}" for v in share[:3]) + " | - |")


if __name__ == "__main__":
    main()
