"""The dry-run planner: its parameter counts are the built model's, its FLOPs the trainer's formula, it reads no
data, checkpointing and FSDP lower what they should, and its memory estimate is within a factor 2 of a measured
peak."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monovlm.data.synthetic import synthesize
from monovlm.train.build import build_model
from monovlm.train.dry_run import dry_run
from monovlm.train.flops import flops_per_token
from monovlm.train.parts import part_of, set_trainable
from monovlm.train.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parent.parent
EXPERTS = {"expert_norms": True, "expert_attention": True, "expert_mlp": True}


def recipe(decoder=None, align=False, **stage):
    """tests/test_train.py's two-stage tiny recipe, with decoder overrides and optionally EVE's align loss."""
    stage = {"batch_size": 4, "max_length": 200, **stage}
    values = {
        "name": "tiny", "seed": 0,
        "model": {"vocab_size": 300,
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True, **(decoder or {})},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [
            {"name": "caption", "data": "captions.json", "template": "plain", "train": ["embedder"], **stage},
            {"name": "qa", "data": "instruct.json", "template": "chatml", "train": ["embedder", "decoder"],
             "grad_accum": 2, "align": align, **stage},
        ],
    }
    if align:
        values["align"] = {"teacher": "vit", "teacher_width": 16, "teacher_depth": 1, "teacher_heads": 2}
    return recipe_from_dict(values)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=40, seed=0, image_size=32, progress=False)
    return root


@pytest.mark.parametrize("decoder", [{}, EXPERTS], ids=["plain", "experts"])
def test_parameters_and_flops_are_those_of_the_built_model(data_root, decoder):
    planned = recipe(decoder)
    model, tokenizer = build_model(planned, data_root)  # trains the BPE on the data: the real thing
    assert tokenizer.vocab_size == planned.model.vocab_size  # else the plan's scratch vocabulary would differ
    report = dry_run(planned, data_root=None, stage="qa", dtype="float32")
    totals: dict[str, int] = {}
    for name, param in model.named_parameters():
        totals[part_of(name)] = totals.get(part_of(name), 0) + param.numel()
    assert {p.part: p.params for p in report.parts} == totals
    assert ("experts" in totals) == bool(decoder)
    assert {p.part: p.trainable for p in report.parts} == {**dict.fromkeys(totals, 0), **set_trainable(model, ["embedder", "decoder"])}
    for stage, plan in zip(planned.stages, report.stages):
        set_trainable(model, stage.train)
        tokens = stage.batch_size * stage.grad_accum * stage.max_length
        assert plan.tokens == tokens
        assert plan.flops == pytest.approx(flops_per_token(model, stage.max_length // 2) * tokens, rel=1e-12)
    qa = report.stages[1]
    per_image = qa.visual_tokens // qa.images
    assert per_image == 2 * 2 + 2 + 1  # 32×32 px at 16 px a token: a 2×2 grid, a separator a row, CLS


def test_align_head_and_teacher_are_planned_without_data(monkeypatch, tmp_path):
    import monovlm.train.build as build

    def no_reading(*args, **kwargs):
        raise AssertionError("the dry run read a data file")

    monkeypatch.setattr(build, "read_data_records", no_reading)
    report = dry_run(recipe(align=True), data_root=tmp_path / "nothing-here", stage="qa", steps=1,
                     dtype="float32")
    assert report.part("align").params > 0 and report.part("align").trainable == report.part("align").params
    assert report.part("teacher").params > 0 and report.part("teacher").trainable == 0
    caption, qa = report.stages
    assert qa.flops > qa.flops_per_token * qa.tokens  # the teacher's forward on the visual tokens
    assert caption.memory.weights < qa.memory.weights  # the teacher is held only where the align loss runs
    assert report.measured.steps == 1 and report.measured.peak_bytes >= 0
    text = report.text()
    assert "teacher" in text and "measured: stage 'qa'" in text


def test_an_hf_teachers_weights_are_planned_in_the_autocast_dtype(tmp_path):
    import dataclasses

    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    transformers.SiglipVisionModel(config).save_pretrained(str(tmp_path / "siglip"))
    base = recipe(align=True)
    hf = dataclasses.replace(base, align=dataclasses.replace(base.align, teacher=f"hf:{tmp_path / 'siglip'}"))
    fp32, bf16 = (dry_run(hf, stage="qa", dtype=dtype) for dtype in ("float32", "bfloat16"))
    teacher = fp32.part("teacher").params
    assert teacher > 0 and bf16.part("teacher").params == teacher
    caption, qa = fp32.stages
    assert qa.memory.weights - caption.memory.weights == 4 * teacher  # stored as loaded, fp32
    caption, qa = bf16.stages
    assert qa.memory.weights - caption.memory.weights == 2 * teacher  # stored in bf16, as the trainer loads it


def test_checkpointing_lowers_the_activation_estimate():
    plain = dry_run(recipe(), dtype="bfloat16")
    checkpointed = dry_run(recipe(), dtype="bfloat16", checkpointing=True)
    for off, on in zip(plain.stages, checkpointed.stages):
        assert on.memory.activations < off.memory.activations
        assert on.memory.activations == off.activations_checkpointed
        assert off.memory.activations == on.activations_plain
        assert on.memory.weights == off.memory.weights and on.flops == off.flops


def test_fsdp_bf16_gathering_and_cpu_offload_lower_the_device_estimate():
    import dataclasses

    base = recipe()
    plain = dry_run(base, strategy="fsdp", world_size=4, dtype="bfloat16")
    mixed = dry_run(dataclasses.replace(base, fsdp_param_dtype="bfloat16"), strategy="fsdp", world_size=4,
                    dtype="bfloat16")
    offload = dry_run(dataclasses.replace(base, fsdp_cpu_offload=True), strategy="fsdp", world_size=4,
                      dtype="bfloat16")
    for p, m, o in zip(plain.stages, mixed.stages, offload.stages):
        # bf16 gathering: two blocks' bf16 weights instead of autocast's bf16 copy of every matmul weight
        assert m.memory.weight_casts < p.memory.weight_casts and m.memory.weights == p.memory.weights
        # offload: nothing of the trained model's states on the device, the gathered blocks are
        assert o.memory.weights == o.memory.gradients == o.memory.optimizer == 0
        assert o.memory.weight_casts > p.memory.weight_casts and o.memory.activations == p.memory.activations
    assert any("offloaded to CPU memory" in note for note in offload.notes)
    ddp = dry_run(dataclasses.replace(base, fsdp_cpu_offload=True), world_size=4, dtype="bfloat16")
    assert ddp.stages[0].memory == dry_run(base, world_size=4, dtype="bfloat16").stages[0].memory  # fsdp only


def test_fsdp_shards_the_states_but_not_the_activations():
    one = dry_run(recipe(), dtype="float32")
    ddp = dry_run(recipe(), world_size=4, dtype="float32")
    fsdp = dry_run(recipe(), strategy="fsdp", world_size=4, dtype="float32")
    for a, b in zip(ddp.stages, fsdp.stages):
        assert b.memory.weights == pytest.approx(a.memory.weights / 4)
        assert b.memory.gradients == pytest.approx(a.memory.gradients / 4)
        assert b.memory.optimizer == pytest.approx(a.memory.optimizer / 4)
        assert b.memory.activations == a.memory.activations
    for single, a, b in zip(one.stages, ddp.stages, fsdp.stages):  # tokens and FLOPs are counted over all devices
        assert a.tokens == b.tokens == 4 * single.tokens
        assert a.flops == pytest.approx(4 * single.flops)
        assert a.memory.weights == single.memory.weights


MEASURE = """
import json, sys
from monovlm.train.dry_run import dry_run
from monovlm.train.recipe import recipe_from_dict
recipe = recipe_from_dict(json.loads(sys.argv[1]))
report = dry_run(recipe, steps=2, dtype="float32", device="cpu", checkpointing=sys.argv[2] == "1")
print(json.dumps({"measured": report.measured.peak_bytes, "estimate": report.measured_estimate,
                  "how": report.measured.how}))
"""


def test_estimate_is_within_a_factor_two_of_the_measured_peak():
    """A small-but-not-tiny model (3.3M parameters, 2 × 256 tokens a step), measured in a fresh process so that memory
    freed by other tests does not hide the growth (float32: CPU bf16 matmuls are too slow for a test)."""
    values = {"name": "mid", "seed": 0,
              "model": {"vocab_size": 2048,
                        "decoder": {"hidden_size": 256, "intermediate_size": 768, "num_layers": 3, "num_heads": 8,
                                    "num_kv_heads": 2},
                        "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 32,
                                   "max_pixels": 128 * 128}},
              "stages": [{"name": "all", "data": "x.json", "template": "plain", "train": ["embedder", "decoder"],
                          "batch_size": 2, "max_length": 256}]}
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(values), "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "VmHWM" not in result["how"]:
        pytest.skip(f"no resettable peak RSS here ({result['how']})")
    assert 0.5 <= result["measured"] / result["estimate"] <= 2.0, result


def test_unknown_stage_and_strategy_are_refused():
    from monovlm.config import ConfigError

    with pytest.raises(ConfigError, match="no stage 'nope'"):
        dry_run(recipe(), stage="nope")
    with pytest.raises(ConfigError, match="strategy"):
        dry_run(recipe(), strategy="zero3")


def test_train_dry_run_plans_a_shipped_recipe_without_any_data(capsys):
    from monovlm.commands import train_command

    train_command("eve", dry_run=True, set=["activation_checkpointing=true"], dtype="float32")
    out = capsys.readouterr().out
    assert "dry run of recipe 'eve'" in out and "activation checkpointing on" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("  prealign", "  pretrain", "  instruct"))] \
        == ["prealign", "pretrain", "instruct"]


def test_the_recipe_switch_checkpoints_training_with_the_same_losses(data_root, tmp_path):
    from monovlm.train.trainer import TrainOptions, train

    def run(name, checkpointing):
        plan = recipe()
        plan.activation_checkpointing = checkpointing
        return train(TrainOptions(recipe=plan, data_root=data_root, run_dir=tmp_path / name, progress=False,
                                  measure_peak=False, eval_data=None, dtype="float32"))

    plain, checkpointed = run("plain", False), run("checkpointed", True)
    assert checkpointed.model.decoder.checkpoint_blocks and not plain.model.decoder.checkpoint_blocks
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_the_command_measures_the_stage_it_is_told(capsys):
    from monovlm.cli import main

    tiny = ["model.decoder.hidden_size=32", "model.decoder.intermediate_size=64", "model.decoder.num_layers=1",
            "model.vision.embedder_width=16", "stages.*.batch_size=2", "stages.*.max_length=128",
            "align.teacher_width=16", "align.teacher_depth=1", "align.teacher_heads=2"]
    args = ["train", "eve", "--dry-run", "--dry-run-steps", "1", "--dtype", "float32", "--dry-run-stage", "instruct"]
    assert main(args + [item for value in tiny for item in ("--set", value)]) == 0
    out = capsys.readouterr().out
    assert "trainable in stage 'instruct'" in out and "measured: stage 'instruct', 1 step(s)" in out
    assert main(args[:-1] + ["2"] + [item for value in tiny for item in ("--set", value)]) == 0  # by index
    assert "measured: stage 'instruct'" in capsys.readouterr().out


def test_bench_train_step_reports_each_stage_and_setting(monkeypatch):
    """benchmarks/bench_train_step.py: one row per (stage, checkpointing), its tokens and TFLOPs the dry run's plan,
    its rates consistent with its step time (the figures a GPU check writes into BENCHMARKS.md)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train_step

    monkeypatch.setattr(bench_train_step, "measure_peak_flops", lambda dtype, device: 1e12)  # no timed burst here
    planned = recipe(batch_size=2, max_length=64)
    monkeypatch.setattr(bench_train_step, "load_recipe", lambda name, overrides: planned)
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "tiny", "--device", "cpu", "--dtype", "float32",
                                      "--steps", "3", "--warmup", "1", "--checkpointing", "off", "on"])
    rows, markdown_table = [], bench_train_step.table
    monkeypatch.setattr(bench_train_step, "table", lambda measured, peak, spec: rows.extend(measured) or "")
    bench_train_step.main()
    plan = dry_run(planned)
    assert [(r["stage"], r["checkpointing"]) for r in rows] == [("caption", False), ("caption", True),
                                                                ("qa", False), ("qa", True)]
    for row in rows:
        stage = next(s for s in plan.stages if s.name == row["stage"])
        assert row["tokens"] == stage.tokens and row["tflops_step"] == pytest.approx(stage.flops / 1e12)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert row["steps_timed"] == 2 and row["peak_gib"] >= 0
    lines = markdown_table(rows, peak_tflops=1.0, spec_tflops=2.0).splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == 11 for line in lines)
    mfu = 100 * rows[0]["tflops_per_s"]  # against a 1 TFLOP/s peak
    assert f"{mfu:.1f}% | {mfu / 2:.1f}% |" in lines[2]
