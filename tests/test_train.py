"""The trainer: a tiny two-stage recipe runs, learns, resumes exactly, freezes what it should, counts its FLOPs."""

import json
import sys
from pathlib import Path

import pytest
import torch

from monovlm.data.synthetic import synthesize
from monovlm.train.parts import part_of
from monovlm.train.recipe import recipe_from_dict, recipe_to_dict
from monovlm.train.trainer import TrainOptions, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from flops_budget import FlopsPlanner, plan_flops  # noqa: E402  benchmarks/flops_budget.py


def tiny_recipe(**stage_overrides):
    stage = dict(batch_size=4, warmup_steps=2, max_length=200, lr=3e-3)
    stage.update(stage_overrides)
    return recipe_from_dict({
        "name": "tiny",
        "seed": 0,
        "model": {"vocab_size": 300,
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [
            {"name": "caption", "data": "captions.json", "template": "plain", "train": ["embedder"], "steps": 4,
             **stage},
            {"name": "qa", "data": "instruct.json", "template": "chatml", "train": ["embedder", "decoder"],
             "steps": 6, "save_every": 3, **stage},
        ],
    })


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=40, seed=0, image_size=32, progress=False)
    return root


def options(recipe, data_root, run_dir, **overrides):
    values = dict(recipe=recipe, data_root=data_root, run_dir=run_dir, progress=False, measure_peak=False,
                  eval_limit=8, dtype="float32")
    values.update(overrides)
    return TrainOptions(**values)


@pytest.mark.parametrize("group_by_length,mixture,stem", [(False, False, "patch"), (True, False, "patch"),
                                                           (False, True, "patch"), (False, False, "cnn")])
def test_resume_gives_the_uninterrupted_loss_sequence(data_root, tmp_path, group_by_length, mixture, stem):
    recipe = tiny_recipe(group_by_length=group_by_length)
    recipe.model.vision["stem"] = stem  # "cnn": BatchNorm, which trains on batch statistics after a resume too
    if mixture:  # the QA stage reads the eve recipe's kind of mixture: grouped conversations twice, drills once
        qa = recipe.stages[1]
        qa.data, qa.repeat = ["instruct_train_no_existence.json", "existence_train.json"], [2, 1]
        qa.group_by_image, qa.loss_norm = [True, False], "sample"
    full = train(options(recipe, data_root, tmp_path / "full"))
    assert len(full.losses) == 10
    interrupted = train(options(recipe, data_root, tmp_path / "cut", stop_after=8))
    assert interrupted.losses == full.losses[:8]
    # the last checkpoint is at global step 7 (qa step 3); resuming recomputes steps 8..10
    resumed = train(options(recipe, data_root, tmp_path / "cut", resume=True))
    assert resumed.losses == full.losses[7:]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_init_stem_starts_the_embedder_as_the_teacher_and_resumes_exactly(data_root, tmp_path):
    """`[align] init_stem`: the embedder's CNN stem starts as the pretrained teacher's (weights and BatchNorm
    statistics: a first stage that does not train the embedder keeps them), and a resumed run does not copy it
    again over the stem trained so far."""
    from monovlm.model.vit import load_vit
    from monovlm.train.recipe import AlignConfig

    recipe = tiny_recipe()
    recipe.model.vision["stem"] = "cnn"
    recipe.align = AlignConfig(teacher_steps=2, teacher_width=16, teacher_depth=0, teacher_stem="cnn", heads=2,
                               init_stem=True)
    recipe.stages[0].train = ["decoder"]
    recipe.stages[1].align = True
    recipe.stages[1].train = [*recipe.stages[1].train, "align"]
    first_stage = train(options(recipe, data_root, tmp_path / "first", stop_after=4))
    teacher_stem = load_vit(tmp_path / "first" / "teacher").patch_embed.state_dict()
    stem = first_stage.model.embedder.patch_conv.state_dict()
    assert stem.keys() == teacher_stem.keys()
    for name, tensor in teacher_stem.items():
        assert torch.equal(stem[name], tensor), name
    assert teacher_stem["1.running_mean"].abs().sum() > 0  # the teacher's statistics, not a fresh BatchNorm's

    full = train(options(recipe, data_root, tmp_path / "full"))
    assert full.losses[:4] == first_stage.losses
    assert not torch.equal(full.model.embedder.patch_conv.state_dict()["0.weight"], teacher_stem["0.weight"])
    train(options(recipe, data_root, tmp_path / "cut", stop_after=8))
    resumed = train(options(recipe, data_root, tmp_path / "cut", resume=True))
    assert resumed.losses == full.losses[7:]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resuming_a_finished_run_says_so_and_runs_only_added_stages(data_root, tmp_path, capsys):
    recipe = tiny_recipe()
    full = train(options(recipe, data_root, tmp_path / "run"))
    capsys.readouterr()
    again = train(options(recipe, data_root, tmp_path / "run", resume=True))
    assert again.losses == [] and "nothing left to train" in capsys.readouterr().out
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    longer = tiny_recipe()
    longer.stages.append(longer.stages[1])  # one more qa stage of 6 steps: only it runs
    more = train(options(longer, data_root, tmp_path / "run", resume=True))
    assert len(more.losses) == 6 and "nothing left to train" not in capsys.readouterr().out
    assert any(not torch.equal(t, more.model.state_dict()[n]) for n, t in full.model.state_dict().items())


def test_frozen_parts_do_not_move_and_metrics_are_written(data_root, tmp_path):
    recipe = tiny_recipe()
    recipe.stages = recipe.stages[:1]  # caption stage: only the embedder trains
    result = train(options(recipe, data_root, tmp_path / "run"))
    from monovlm.train.build import build_model

    torch.manual_seed(recipe.seed)  # rebuilt exactly as the trainer built it: the weights the run started from
    start, _ = build_model(recipe, data_root)
    for name, tensor in result.model.state_dict().items():
        moved = not torch.equal(tensor, start.state_dict()[name])
        assert moved == (part_of(name) == "embedder"), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if "loss" in json.loads(line)]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["tokens_per_s"] > 0 for s in steps)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_stage_with_prior_weighting_trains_and_weighs_the_loss_otherwise(data_root, tmp_path):
    recipe = tiny_recipe()
    recipe.stages = recipe.stages[1:2]
    recipe.stages[0].steps, recipe.stages[0].save_every = 2, 0
    plain = train(options(recipe, data_root, tmp_path / "plain"))
    recipe.stages[0].loss_weighting = "prior"
    weighted = train(options(recipe, data_root, tmp_path / "prior"))
    assert len(weighted.losses) == 2 and all(loss == loss and loss > 0 for loss in weighted.losses)
    assert weighted.losses[0] != plain.losses[0]  # the same first batch, weighted otherwise
    recipe.stages[0].prior_power = 0.0  # every weight 1: the plain loss
    assert train(options(recipe, data_root, tmp_path / "flat")).losses[0] == pytest.approx(plain.losses[0], rel=1e-5)


def test_shifted_images_train_otherwise_and_resume_exactly(data_root, tmp_path):
    recipe = tiny_recipe()
    plain = train(options(recipe, data_root, tmp_path / "plain", stop_after=5))
    for stage in recipe.stages:
        stage.image_shift = 4
    full = train(options(recipe, data_root, tmp_path / "full"))
    assert full.losses[0] != plain.losses[0]  # the same first batch, its images shifted
    train(options(recipe, data_root, tmp_path / "cut", stop_after=8))
    resumed = train(options(recipe, data_root, tmp_path / "cut", resume=True))
    assert resumed.losses == full.losses[7:]  # the shifts are drawn by step: a resumed run draws the same


def test_a_stage_can_train_the_llms_attention_alone(data_root, tmp_path):
    """`attention` (Mono-InternVL's EViP alignment stage): q/k/v/o of every layer move; the LLM's FFNs, norms and
    embeddings do not."""
    recipe = tiny_recipe()
    recipe.stages = recipe.stages[1:2]
    recipe.stages[0].steps, recipe.stages[0].save_every, recipe.stages[0].train = 2, 0, ["attention"]
    result = train(options(recipe, data_root, tmp_path / "run"))
    from monovlm.train.build import build_model

    torch.manual_seed(recipe.seed)
    start, _ = build_model(recipe, data_root)
    moved = {name for name, tensor in result.model.state_dict().items() if not torch.equal(tensor, start.state_dict()[name])}
    attention = {name for name in start.state_dict() if ".attn." in name and name.startswith("decoder.layers.")}
    assert moved and moved <= attention
    assert {name.split(".attn.")[1].split(".")[0] for name in moved} >= {"o_proj"}  # not only one projection
    assert all(part_of(name) == "decoder" for name in attention)  # a part of the decoder, trained on its own


def test_a_stages_system_prompt_is_trained_on_and_saved_with_the_model(data_root, tmp_path):
    from monovlm.data.processor import Processor
    from monovlm.eval.protocol import ModelRunner
    from monovlm.train.data import stage_processor

    recipe = tiny_recipe(system_prompt="Answer in one word.")
    recipe.stages = recipe.stages[1:]
    recipe.stages[0].steps, recipe.stages[0].save_every = 1, 0
    result = train(options(recipe, data_root, tmp_path / "run"))
    record = json.loads((data_root / "instruct.json").read_text())[0]
    trained = stage_processor(recipe.stages[0], result.tokenizer, result.model.config.vision).process(record, data_root)
    system = result.tokenizer.encode("system\nAnswer in one word.")
    assert trained.input_ids[1 : 1 + len(system)] == system  # <|im_start|>system\n... opens the sample
    served = ModelRunner.load(tmp_path / "run" / "final").processor
    assert served.config.system_prompt == "Answer in one word."
    ids, _ = served.prompt("What colour is the circle?")
    plain, _ = Processor(result.tokenizer, result.model.config.vision).prompt("What colour is the circle?")
    assert ids[: len(trained.input_ids[: 1 + len(system)])] == trained.input_ids[: 1 + len(system)]
    assert len(ids) > len(plain)


def test_training_lowers_the_loss(data_root, tmp_path):
    recipe = tiny_recipe()
    recipe.stages = recipe.stages[1:]
    recipe.stages[0].steps = 25
    recipe.stages[0].save_every = 0
    result = train(options(recipe, data_root, tmp_path / "run", dtype="bfloat16"))
    assert sum(result.losses[-5:]) / 5 < 0.85 * sum(result.losses[:3]) / 3


def test_sample_loss_norm_sums_each_samples_mean_loss():
    from torch.nn import functional as F

    from monovlm.data.processor import IGNORE_INDEX
    from monovlm.model.vlm import labelled_cross_entropy, per_sample_token_weights

    torch.manual_seed(0)
    hidden, output_weight = torch.randn(2, 9, 8), torch.randn(11, 8)  # (B, T, C), (V, C)
    labels = torch.full((2, 9), IGNORE_INDEX)
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2],   # a packed row: two samples
                             [1, 1, 1, 1, 1, 1, 0, 0, 0]])  # one sample, then padding
    answers = {(0, 1): [2, 3, 4], (0, 2): [8], (1, 1): [1, 2, 3, 4, 5]}  # (row, segment) -> labelled positions
    for (row, _), positions in answers.items():
        labels[row, positions] = torch.randint(0, 11, (len(positions),))
    weights, samples = per_sample_token_weights(labels, segments)
    total = labelled_cross_entropy(hidden, labels, output_weight, reduction="sum", token_weights=weights)
    means = [F.cross_entropy(hidden[row, [t - 1 for t in positions]] @ output_weight.T, labels[row, positions])
             for (row, _), positions in answers.items()]  # position t is predicted from position t-1
    assert samples == 3
    assert torch.allclose(total, torch.stack(means).sum())
    token_sum = labelled_cross_entropy(hidden, labels, output_weight, reduction="sum")
    assert not torch.allclose(total / samples, token_sum / 9)  # really another normalisation


def test_stage_settings_are_checked():
    from monovlm.config import ConfigError

    with pytest.raises(ConfigError, match="loss_norm 'samples'"):
        tiny_recipe(loss_norm="samples")
    with pytest.raises(ConfigError, match="unknown part"):
        tiny_recipe(train=["vision"])
    with pytest.raises(ConfigError, match="repeat needs data to be a list"):
        tiny_recipe(repeat=[2])
    with pytest.raises(ConfigError, match="one positive integer per data file"):
        tiny_recipe(data=["a.json", "b.json"], repeat=[2])
    with pytest.raises(ConfigError, match="one positive integer per data file"):
        tiny_recipe(data=["a.json", "b.json"], repeat=[2, 0])
    with pytest.raises(ConfigError, match="non-empty list of file names"):
        tiny_recipe(data=[])
    with pytest.raises(ConfigError, match="one true/false per data file"):
        tiny_recipe(data=["a.json", "b.json"], group_by_image=[True])
    for shift in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="image_shift"):
            tiny_recipe(image_shift=shift)
    values = recipe_to_dict(tiny_recipe(image_shift=2))
    values["stages"][1]["align"] = True
    recipe_from_dict({**values, "align": {"teacher": "vit"}})  # a teacher that reads the shifted pixels
    with pytest.raises(ConfigError, match="precomputed for the unshifted images"):
        recipe_from_dict({**values, "align": {"teacher": "features:teacher.safetensors"}})
    from monovlm.train.recipe import AlignConfig

    with pytest.raises(ConfigError, match="whiten_images=0"):
        AlignConfig(whiten=True, whiten_images=0)


@pytest.mark.parametrize("loss_norm", ["token", "sample"])
def test_gradient_accumulation_equals_one_big_batch(data_root, tmp_path, loss_norm):
    losses = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        recipe = tiny_recipe(batch_size=batch_size, grad_accum=grad_accum, loss_norm=loss_norm, save_every=0)
        recipe.stages = recipe.stages[1:]
        losses.append(train(options(recipe, data_root, tmp_path / f"b{batch_size}")).losses)
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.slow  # a training run per recipe (the generic ones run on a user's folder in test_recipes.py)
@pytest.mark.parametrize("name", ["eve-synthetic", "llava-synthetic"])
def test_every_synthetic_recipe_runs(name, data_root, tmp_path):
    from monovlm.train.recipe import load_recipe

    recipe = load_recipe(name)
    recipe.model.encoder_steps = 2
    if recipe.align is not None:
        recipe.align.teacher_steps = 2
    for stage in recipe.stages:
        stage.steps, stage.batch_size, stage.warmup_steps = 2, 4, 1
    result = train(options(recipe, data_root, tmp_path / name, eval_limit=4))
    assert len(result.losses) == 2 * len(recipe.stages)
    assert all(loss == loss and loss > 0 for loss in result.losses)  # finite, positive
    if recipe.align is not None:
        align_steps = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                       if '"align"' in line]
        assert any(step["align"] > 0 for step in align_steps)


def logged_flops(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["flops"] for line in lines if '"loss"' in line]


@pytest.mark.parametrize("group_by_image,group_by_length,mixture", [(False, False, False), (True, False, False),
                                                                   (True, True, False), (True, False, True)])
def test_flops_plan_equals_what_the_trainer_counts(data_root, tmp_path, group_by_image, group_by_length, mixture):
    """The prediction replays the batch stream over per-sample token counts: every step's FLOPs must equal the
    trainer's log exactly, teacher forwards included (the align loss on in the second stage only), also when the QA
    stage merges each image's questions into one multi-turn sample, batches samples of similar length, or reads a
    mixture of files (the QA file twice, grouped, the captions once)."""
    from monovlm.train.recipe import AlignConfig

    recipe = tiny_recipe()
    recipe.align = AlignConfig(teacher_steps=1, teacher_width=16, teacher_depth=1, teacher_heads=2, heads=2)
    recipe.stages[1].align = True
    recipe.stages[1].train = [*recipe.stages[1].train, "align"]
    recipe.stages[1].save_every = 0
    recipe.stages[1].group_by_image = group_by_image
    recipe.stages[1].group_by_length = group_by_length
    if mixture:
        recipe.stages[1].data, recipe.stages[1].repeat = ["instruct.json", "captions.json"], [2, 1]
        recipe.stages[1].group_by_image = [group_by_image, False]
    plan = plan_flops(recipe, data_root)
    assert [s.steps for s in plan.stages] == [4, 6]
    assert plan.stages[0].teacher_params == 0 and plan.stages[1].teacher_params > 0
    train(options(recipe, data_root, tmp_path / "run", eval_data=None))
    logged = logged_flops(tmp_path / "run")
    assert [f for s in plan.stages for f in s.step_flops] == logged
    assert len(set(logged)) > 2  # steps differ (different samples): a constant per-step guess would not pass


def test_fit_to_budget_lengthens_only_the_last_stage(data_root, tmp_path):
    recipe = tiny_recipe()
    recipe.stages[1].save_every = 0
    planner = FlopsPlanner(recipe, data_root)
    default = planner.plan()
    assert planner.fit(default.total).recipe.stages[1].steps == 6  # its own total: the recipe as written
    budget = 1.3 * default.total
    fitted = planner.fit(budget)
    assert fitted.recipe.stages[0].steps == 4 and fitted.recipe.stages[1].steps > 6
    assert recipe.stages[1].steps == 6  # the input recipe is not modified
    last_step = fitted.stages[1].step_flops[-1]
    assert abs(fitted.total - budget) <= last_step / 2 + 1e-6 * budget  # the nearest step count
    result = train(options(fitted.recipe, data_root, tmp_path / "fitted", eval_data=None))
    assert len(result.losses) == 4 + fitted.recipe.stages[1].steps
    assert sum(logged_flops(tmp_path / "fitted")) == pytest.approx(fitted.total, rel=1e-12)
    with pytest.raises(ValueError, match="stages before 'qa' already spend"):
        planner.fit(default.stages[0].total / 2)


def test_optimizer_state_loads_by_name_and_refuses_other_parameters():
    """Checkpoints keep the optimizer state keyed by parameter name (so DDP and FSDP checkpoints are one format);
    an older integer-keyed state still loads, and a state for other trainable parameters is an error that names them."""
    from torch import nn

    from monovlm.train.distributed import DistInfo, gather_state, load_optimizer_state

    def make():
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        return module, torch.optim.AdamW(module.parameters(), lr=1e-2)

    module, optimizer = make()
    module(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    _, named = gather_state(module, optimizer, DistInfo(), "ddp", with_optimizer=True)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for saved in (named, optimizer.state_dict()):  # by name, and the integer-keyed layout of older checkpoints
        fresh, fresh_optimizer = make()
        load_optimizer_state(fresh, fresh_optimizer, saved, DistInfo(), "ddp")
        for param, fresh_param in zip(module.parameters(), fresh.parameters()):
            for key, value in optimizer.state[param].items():
                assert torch.equal(value, fresh_optimizer.state[fresh_param][key]), key
    fresh, fresh_optimizer = make()
    fresh[1].weight.requires_grad_(False)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['1.weight'\]"):
        load_optimizer_state(fresh, fresh_optimizer, named, DistInfo(), "ddp")


# -------------------------------------------------------------------------------------------------------------------
# FLOPs per token and the machine's peak


def part_params(model, part, matrices_only=False):
    return sum(p.numel() for name, p in model.named_parameters()
               if part_of(name) == part and "embed_tokens" not in name and (p.dim() >= 2 or not matrices_only))


@pytest.fixture(scope="module")
def tiny_models(data_root):
    """(encoder-free model, baseline with a ViT encoder, one QA batch of the encoder-free model's tokenizer)."""
    from monovlm.train.build import build_model
    from monovlm.train.data import stage_dataset, stage_processor, stage_stream

    recipe = tiny_recipe()
    torch.manual_seed(0)
    model, tokenizer = build_model(recipe, data_root)
    baseline_recipe = tiny_recipe()
    baseline_recipe.model.encoder = {"width": 16, "depth": 1, "heads": 2}
    baseline, _ = build_model(baseline_recipe, data_root)
    stage = recipe.stages[1]
    dataset = stage_dataset(stage, stage_processor(stage, tokenizer, model.config.vision), data_root)
    batch = stage_stream(stage, dataset, 4, 0, tokenizer.pad_id or 0, announce_epochs=False).next_batch()
    return model, baseline, batch


@pytest.mark.parametrize("baseline,train,per_part", [
    (False, ["embedder", "decoder"], {"embedder": 6, "decoder": 6}),
    (False, ["embedder"], {"embedder": 6, "decoder": 4}),  # EVE's pre-align: the frozen decoder still backpropagates
    (False, ["decoder"], {"embedder": 2, "decoder": 6}),  # nothing trains before the embedder: forward only
    # LLaVA's alignment stage (its frozen "embedder" part: the CLS and row-separator embeddings beside the projector)
    (True, ["projector"], {"encoder": 2, "embedder": 2, "projector": 6, "decoder": 4}),
])
def test_flops_per_token_counts_frozen_parts_at_what_they_run(tiny_models, baseline, train, per_part):
    """Per token and weight: 6 FLOPs trained, 4 frozen behind a trained part (forward + its input's gradient), 2
    frozen with nothing trained before it (forward only); attention 12·L·C·T as something before it trains."""
    from monovlm.train.flops import flops_per_token
    from monovlm.train.parts import set_trainable

    model = tiny_models[1] if baseline else tiny_models[0]
    set_trainable(model, train)
    config = model.config.decoder
    head = model.decoder.embed_tokens.weight.numel()  # tied: the output matmul
    expected = sum(factor * part_params(model, part) for part, factor in per_part.items()) + per_part["decoder"] * head
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * 100
    assert flops_per_token(model, 100) == expected + attention


@pytest.mark.parametrize("train,per_weight", [(["embedder", "decoder"], 6), (["embedder"], 4)])
def test_the_flop_counter_sees_a_frozen_decoder_run_four_flops_per_weight(tiny_models, train, per_weight):
    """What the count above claims, measured by torch's FLOP counter: the decoder layers' matmuls (forward and
    backward) cost 6 FLOPs per weight and token when they train and 4 when they are frozen behind a trained embedder,
    plus 12·L·C·T attention either way."""
    import re

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from monovlm.train.parts import set_trainable
    from monovlm.train.trainer import TrainModule

    model, _, batch = tiny_models
    module = TrainModule(model)
    set_trainable(module, train)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ce_sum, _ = module(batch)
        ce_sum.backward()
    module.zero_grad(set_to_none=True)
    layers = [ops for name, ops in counter.get_flop_counts().items() if re.search(r"decoder\.layers\.\d+$", name)]
    measured = sum(sum(ops.values()) for ops in layers)
    config = model.config.decoder
    rows, length = batch.input_ids.shape
    matrices = sum(p.numel() for p in model.decoder.layers.parameters() if p.dim() >= 2)
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * length
    assert len(layers) == config.num_layers
    assert measured == (per_weight * matrices + attention) * rows * length


def test_the_peak_cache_keeps_the_best_measurement_per_machine(tmp_path, monkeypatch):
    """A first measurement on a busy machine (low) is raised by a later quiet one and never lowered by a busy one."""
    from monovlm.train import flops

    measurements = iter([1e12, 0.5e12, 2e12, 3e12, 7e12, 8e12])
    calls = []

    def fake_measure(dtype, device, seconds=None):
        calls.append((dtype, seconds))
        return next(measurements)

    monkeypatch.setattr(flops, "measure_peak_flops", fake_measure)
    cache = tmp_path / "cache" / "peak_flops.json"
    bf16, fp32 = flops.peak_key(torch.bfloat16, "cpu"), flops.peak_key(torch.float32, "cpu")
    assert flops.peak_flops(torch.bfloat16, "cpu", cache) == 1e12  # nothing cached: measured in full
    assert flops.peak_flops(torch.bfloat16, "cpu", cache) == 1e12  # a busy recheck (0.5e12) does not lower it
    assert flops.peak_flops(torch.bfloat16, "cpu", cache) == 2e12  # a quiet recheck raises it
    assert flops.peak_flops(torch.float32, "cpu", cache) == 3e12  # another key: measured in full
    assert [budget for _, budget in calls] == [None, 0.2, 0.2, None]  # a full measurement, then brief rechecks
    assert json.loads(cache.read_text()) == {bf16: 2e12, fp32: 3e12}
    assert "threads" in bf16 and "bfloat16" in bf16
    cache.write_text("{not json")  # a damaged cache is measured again and rewritten, not an error
    assert flops.peak_flops(torch.bfloat16, "cpu", cache) == 7e12
    assert json.loads(cache.read_text()) == {bf16: 7e12}
    assert flops.peak_flops(torch.bfloat16, "cpu", None) == 8e12  # no cache: measured in full, nothing kept
    assert calls[-1][1] is None and json.loads(cache.read_text()) == {bf16: 7e12}


def test_the_peak_cache_lives_in_the_users_cache_folder_unless_told_otherwise(tmp_path, monkeypatch):
    from monovlm.train.flops import PEAK_CACHE_ENV, peak_cache_path

    monkeypatch.delenv(PEAK_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert peak_cache_path() == tmp_path / "xdg" / "monovlm" / "peak_flops.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert peak_cache_path() == tmp_path / "home" / ".cache" / "monovlm" / "peak_flops.json"
    monkeypatch.setenv(PEAK_CACHE_ENV, str(tmp_path / "mine.json"))
    assert peak_cache_path() == tmp_path / "mine.json"
    monkeypatch.setenv(PEAK_CACHE_ENV, "off")
    assert peak_cache_path() is None


def test_the_measured_peak_is_the_best_burst(monkeypatch):
    """On a scripted clock (each matmul takes the next duration): the rate of the fastest timed burst, warm-ups not
    timed, at least min_bursts even with no time budget, and the best size wins."""
    from monovlm.train import flops

    clock = {"now": 0.0, "durations": iter([9.0, 9.0, 0.5, 0.25, 1.0])}  # two warm-ups, then three timed bursts
    real_matmul = torch.matmul

    def scripted_matmul(*args, **kwargs):
        clock["now"] += next(clock["durations"])
        return real_matmul(*args, **kwargs)

    monkeypatch.setattr(flops.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(torch, "matmul", scripted_matmul)
    assert flops.matmul_rate(torch.float32, 64, seconds=0.0, min_bursts=3) == 2.0 * 64**3 / 0.25
    clock["durations"] = iter([1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 4.0, 4.0, 4.0])  # size 32: bursts of 2 s; 64: 4 s
    peak = flops.measure_peak_flops(torch.float32, sizes=(32, 64), seconds=0.0)
    assert peak == max(2.0 * 32**3 / 2.0, 2.0 * 64**3 / 4.0)


def test_mfu_shown_never_exceeds_100_percent(data_root, tmp_path, capsys):
    from monovlm.train.trainer import Trainer

    trainer = Trainer(options(tiny_recipe(), data_root, tmp_path / "run"))
    trainer.device_peak = 1e9
    assert trainer.mfu_text(0.25) == "25.0%"
    assert trainer.mfu_text(1.4) == "100.0%"
    assert trainer.mfu_text(1.2) == "100.0%"
    assert capsys.readouterr().out.count("exceeds the measured matmul peak") == 1  # said once
    assert trainer.mfu_text(float("nan")) == "nan%"  # no peak measured


def test_auto_precision_takes_bf16_only_where_it_is_fast(data_root, tmp_path, capsys, monkeypatch):
    import monovlm.train.trainer as trainer_module
    from monovlm.train.flops import autocast_dtype

    dtype, why = autocast_dtype("cpu")
    assert dtype in ("bfloat16", "float32") and "GFLOP/s" in why
    monkeypatch.setattr(trainer_module, "autocast_dtype", lambda device: ("float32", "stub: no native bf16"))
    recipe = tiny_recipe()
    recipe.stages = recipe.stages[:1]
    recipe.stages[0].steps = 1
    options_auto = options(recipe, data_root, tmp_path / "run", dtype="auto")
    train(options_auto)
    assert "autocast: float32 (stub: no native bf16)" in capsys.readouterr().out
    assert options_auto.dtype == "auto"  # the caller's options are not changed
