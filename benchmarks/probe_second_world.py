"""Linear probe on the second world: does a trained model's visual token at a shape's centre cell say the shape's
kind and colour? The scenes of the first N training images are drawn again from the generator's seeded streams (the
same scenes `second_world.py --seed 0` wrote); the probe reads the embedder's output and the hidden state after
decoder block 2 at each shape's centre cell, fits a linear classifier on 80% of the shapes, scores the other 20%
(beside the most frequent class's share).

    python benchmarks/probe_second_world.py RUN/final 1200     # images under /tmp/world2/images
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from second_world import _SCENE, COLOURS, KINDS, SPLITS, sample_scene  # noqa: E402
from monovlm.data.images import image_to_tensor, load_image  # noqa: E402
from monovlm.data.layout import TokenLayout  # noqa: E402
from monovlm.model.align import HiddenCapture  # noqa: E402
from monovlm.model.vlm import EncoderFreeVLM  # noqa: E402
torch.set_num_threads(2)
model = EncoderFreeVLM.load(sys.argv[1]).eval()
vision = model.config.vision
colours = list(COLOURS)
feats = {"embedder": [], "layer2": []}; kinds = []; cols = []
n = int(sys.argv[2])
with torch.no_grad():
    for i in range(n):
        scene = sample_scene(np.random.default_rng([0, SPLITS["train"], i, _SCENE]), 64)
        img = image_to_tensor(load_image(f"/tmp/world2/images/train_{i:05d}.png"), vision)
        layout = TokenLayout.for_image(img, vision)
        idx = layout.patch_index
        ids = torch.full((1, layout.num_tokens), model.image_token_id)
        x, vm = model.embed(ids, [img])
        with HiddenCapture(model.decoder, [2]) as cap:
            model.hidden_states(ids, [img], torch.ones_like(ids))
        tok_e = x[0][idx].view(layout.rows, layout.cols, -1)
        tok_2 = cap.states[0][0][idx].view(layout.rows, layout.cols, -1)
        for s in scene.shapes:
            r, c = min(int(s.cy * layout.rows / 64), layout.rows - 1), min(int(s.cx * layout.cols / 64), layout.cols - 1)
            feats["embedder"].append(tok_e[r, c]); feats["layer2"].append(tok_2[r, c])
            kinds.append(KINDS.index(s.kind)); cols.append(colours.index(s.colour))
def probe(X, y, classes):
    X = torch.stack(X).float(); y = torch.tensor(y)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    cut = int(0.8 * len(y))
    w = torch.zeros(X.shape[1], classes, requires_grad=True); b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(X[:cut] @ w + b, y[:cut]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    acc = ((X[cut:] @ w + b).argmax(1) == y[cut:]).float().mean().item()
    major = torch.bincount(y[cut:]).max().item() / (len(y) - cut)
    return round(100 * acc, 1), round(100 * major, 1)
for name, X in feats.items():
    print(sys.argv[1], name, "kind", probe(X, kinds, len(KINDS)), "colour", probe(X, cols, len(colours)), "shapes", len(kinds))
