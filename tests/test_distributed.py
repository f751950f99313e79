"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process loss curve at the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

from monovlm.data.synthetic import synthesize

RECIPE = """
name = "dist"
seed = 0
[model]
vocab_size = 300
[model.decoder]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 2
num_kv_heads = 1
[model.vision]
embedder = "conv"
patch_size = 8
merge = 2
embedder_width = 16
max_pixels = 1024
[[stages]]
name = "qa"
data = "instruct_train.json"
template = "chatml"
train = ["embedder", "decoder"]
steps = 5
batch_size = {batch_size}
lr = 3e-3
warmup_steps = 1
max_length = 200
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=40, seed=0, image_size=32, progress=False)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, data_root, name, batch_size, nproc=None, strategy="ddp"):
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(batch_size=batch_size))
    args = ["-m", "monovlm", "train", str(recipe), "--data", str(data_root), "--out", str(tmp_path / name),
            "--dtype", "float32", "--no-progress", "--eval-data", "none", "--strategy", strategy]
    if nproc:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, data_root, strategy):
    single = run(tmp_path, data_root, "single", batch_size=8)
    double = run(tmp_path, data_root, f"{strategy}2", batch_size=4, nproc=2, strategy=strategy)
    assert len(single) == len(double) == 5
    for a, b in zip(single, double):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (single, double)
