"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process loss curve at the same global batch,
and a 2-process run killed after a checkpoint resumes to exactly the uninterrupted 2-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from monovlm.data.synthetic import synthesize

pytestmark = pytest.mark.slow  # torchrun launches

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
data = "instruct.json"
template = "chatml"
train = ["embedder", "decoder"]
steps = 5
save_every = 2
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


# a first stage that trains the embedder alone: the next stage trains more of the same (already wrapped) module
FROZEN_DECODER_STAGE = """
[[stages]]
name = "embedder"
data = "instruct.json"
template = "chatml"
train = ["embedder"]
steps = 2
batch_size = {batch_size}
lr = 3e-3
warmup_steps = 1
max_length = 200
"""


def run(tmp_path, data_root, name, batch_size, nproc=None, strategy="ddp", *extra, first_stage="") -> list[float]:
    """Train the recipe (after `first_stage`, when given) into tmp_path/name; the losses of every optimizer step in
    its metrics.jsonl, in order (a resumed run cuts the file back to its checkpoint and appends to it)."""
    recipe = tmp_path / f"{name}.toml"
    head, stages = RECIPE.split("[[stages]]", 1)
    recipe.write_text((head + first_stage + "[[stages]]" + stages).format(batch_size=batch_size))
    args = ["-m", "monovlm", "train", str(recipe), "--data", str(data_root), "--out", str(tmp_path / name),
            "--dtype", "float32", "--no-progress", "--no-eval", "--strategy", strategy, *extra]
    if nproc:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())] + args
    # the matmul peak is measured once for all launches, and cached beside the test data, not in the user's home
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONOVLM_PEAK_CACHE": str(data_root.parent / "peak_flops.json")}
    done = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    run.output = done.stdout + done.stderr  # what the last launch printed
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, data_root):
    """The uninterrupted 2-process run per strategy, shared by the tests below (each launch costs ~10 s)."""
    cache = {}

    def get(strategy):
        if strategy not in cache:
            tmp_path = tmp_path_factory.mktemp(f"{strategy}2")
            cache[strategy] = (tmp_path, run(tmp_path, data_root, "full", 4, 2, strategy))
        return cache[strategy]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, data_root, two_process_runs, strategy):
    single = run(tmp_path, data_root, "single", batch_size=8)
    _, double = two_process_runs(strategy)
    assert len(single) == len(double) == 5
    for a, b in zip(single, double):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (single, double)


def test_data_workers_under_ddp_give_each_rank_the_same_batches(tmp_path, data_root, two_process_runs):
    """With a worker process per rank reading and collating, each rank trains on exactly the micro-batches it reads
    in process: the 2-rank loss curve is the in-process one, number for number."""
    _, in_process = two_process_runs("ddp")
    with_workers = run(tmp_path, data_root, "workers", 4, 2, "ddp", "--set", "data.num_workers=1")
    assert "read by 1 worker process per rank" in run.output
    assert with_workers == in_process


def test_fsdp_cpu_offload_trains_as_without_it(tmp_path, data_root, two_process_runs):
    """Shards, gradients and AdamW states in CPU memory (here the device is the CPU too): the same curve to float
    rounding as the run without offload."""
    _, fsdp = two_process_runs("fsdp")
    offloaded = run(tmp_path, data_root, "offload", 4, 2, "fsdp", "--set", "fsdp_cpu_offload=true")
    assert "FSDP2: fsdp_cpu_offload = true" in run.output
    for a, b in zip(fsdp, offloaded, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (fsdp, offloaded)


def test_fsdp_bf16_parameters_train_close_to_fp32_and_save_fp32(tmp_path, data_root, two_process_runs):
    """Parameters gathered in bf16, gradients reduced in fp32: the curve within bf16 rounding of the fp32 run's, and
    the saved weights are the fp32 shards."""
    fsdp_dir, fsdp = two_process_runs("fsdp")
    mixed = run(tmp_path, data_root, "bf16", 4, 2, "fsdp", "--set", "fsdp_param_dtype=bfloat16")
    assert "FSDP2: fsdp_param_dtype = bfloat16" in run.output
    for a, b in zip(fsdp, mixed, strict=True):
        assert abs(a - b) <= 3e-2 * max(1.0, abs(a)), (fsdp, mixed)
    assert mixed != fsdp  # the gathered weights really were bf16
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    reference = load_file(fsdp_dir / "full" / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {t.dtype for t in reference.values()} == {torch.float32}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_second_stage_with_more_trainable_parts_matches_one_process(tmp_path, data_root, strategy):
    """Each stage wraps the module for its strategy; FSDP2 shards in place, so a later stage must train the module
    the first stage sharded (sharding it twice is refused by torch), now with the decoder unfrozen."""
    single = run(tmp_path, data_root, "single", 8, first_stage=FROZEN_DECODER_STAGE)
    double = run(tmp_path, data_root, "double", 4, 2, strategy, first_stage=FROZEN_DECODER_STAGE)
    assert len(single) == len(double) == 7
    for a, b in zip(single, double):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (single, double)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_is_exact(tmp_path, data_root, two_process_runs, strategy):
    """Killed after step 3 (last checkpoint: step 2, saved with the optimizer state gathered from the shards),
    resumed on 2 processes: steps 3..5 must repeat the uninterrupted run's losses bit for bit, and the final
    weights must be identical. Exact equality is expected even under gloo: both runs execute the same collectives
    on the same inputs in the same order, and with 2 ranks each reduced element is one addition (commutative in
    IEEE arithmetic), so nothing but a wrongly restored state can make them differ."""
    full_dir, full = two_process_runs(strategy)
    cut = run(tmp_path, data_root, "cut", 4, 2, strategy, "--stop-after", "3")
    assert cut == full[:3]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_000002"]
    logged = run(tmp_path, data_root, "cut", 4, 2, strategy, "--resume")
    # metrics.jsonl is cut back to the checkpoint (step 2) and continued: the log is the uninterrupted run's
    assert logged == full, (full, cut, logged)
    final = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    reference = load_file(full_dir / "full" / "final" / "model.safetensors")
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name


def test_ddp_checkpoint_resumes_under_fsdp(tmp_path, data_root, two_process_runs):
    """The optimizer state is saved keyed by parameter name under every strategy, so a DDP checkpoint (whose
    optimizer once saved integer ids, which FSDP cannot load) continues under FSDP. DDP and FSDP reduce gradients
    differently (all-reduce vs reduce-scatter), so the curves agree to float rounding (~1e-7 here), not bit for bit;
    an optimizer restarted from scratch instead misses by ~2e-2 at the second resumed step (the first resumed loss
    depends only on the saved weights)."""
    _, fsdp = two_process_runs("fsdp")
    cut = run(tmp_path, data_root, "cut", 4, 2, "ddp", "--stop-after", "3")
    resumed = run(tmp_path, data_root, "cut", 4, 2, "fsdp", "--resume")[2:]  # the log continues from step 2
    assert len(cut) == 3 and len(resumed) == 3
    for a, b in zip(resumed, fsdp[2:]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (fsdp, resumed)


def test_flops_plan_matches_the_two_process_run(data_root, two_process_runs):
    """The FLOPs budget planner (one process) predicts exactly what 2 ranks count: their micro-batches of 4 are the
    global batch of 8 that it replays."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from flops_budget import plan_flops  # benchmarks/flops_budget.py

    from monovlm.train.recipe import load_recipe

    run_dir, _ = two_process_runs("ddp")
    lines = (run_dir / "full" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["flops"] for line in lines if '"loss"' in line]
    plan = plan_flops(load_recipe(run_dir / "full.toml"), data_root, world_size=2)
    assert plan.stages[0].step_flops == logged
