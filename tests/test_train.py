"""The trainer: a tiny two-stage recipe runs, learns, resumes exactly, freezes what it should."""

import json

import pytest
import torch

from monovlm.data.synthetic import synthesize
from monovlm.train.parts import part_of
from monovlm.train.recipe import recipe_from_dict
from monovlm.train.trainer import TrainOptions, train


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
            {"name": "caption", "data": "pretrain.json", "template": "plain", "train": ["embedder"], "steps": 4,
             **stage},
            {"name": "qa", "data": "instruct_train.json", "template": "chatml", "train": ["embedder", "decoder"],
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


@pytest.mark.parametrize("group_by_length,mixture", [(False, False), (True, False), (False, True)])
def test_resume_gives_the_uninterrupted_loss_sequence(data_root, tmp_path, group_by_length, mixture):
    recipe = tiny_recipe(group_by_length=group_by_length)
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
    from monovlm.model.vlm import EncoderFreeVLM

    initial = EncoderFreeVLM(result.model.config)  # same seed -> same init as the run's start
    torch.manual_seed(0)
    # rebuild exactly as the trainer did to compare decoder weights
    from monovlm.train.build import build_model

    torch.manual_seed(recipe.seed)
    start, _ = build_model(recipe, data_root)
    for name, tensor in result.model.state_dict().items():
        moved = not torch.equal(tensor, start.state_dict()[name])
        assert moved == (part_of(name) == "embedder"), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if "loss" in json.loads(line)]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["tokens_per_s"] > 0 for s in steps)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    del initial


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


@pytest.mark.parametrize("name", ["eve", "evev2", "solo", "llava"])
def test_every_shipped_recipe_runs(name, data_root, tmp_path):
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
    from monovlm.train.budget import plan_flops
    from monovlm.train.recipe import AlignConfig

    recipe = tiny_recipe()
    recipe.align = AlignConfig(teacher_steps=1, teacher_width=16, teacher_depth=1, teacher_heads=2, heads=2)
    recipe.stages[1].align = True
    recipe.stages[1].train = [*recipe.stages[1].train, "align"]
    recipe.stages[1].save_every = 0
    recipe.stages[1].group_by_image = group_by_image
    recipe.stages[1].group_by_length = group_by_length
    if mixture:
        recipe.stages[1].data, recipe.stages[1].repeat = ["instruct_train.json", "pretrain.json"], [2, 1]
        recipe.stages[1].group_by_image = [group_by_image, False]
    plan = plan_flops(recipe, data_root)
    assert [s.steps for s in plan.stages] == [4, 6]
    assert plan.stages[0].teacher_params == 0 and plan.stages[1].teacher_params > 0
    train(options(recipe, data_root, tmp_path / "run", eval_data=None))
    logged = logged_flops(tmp_path / "run")
    assert [f for s in plan.stages for f in s.step_flops] == logged
    assert len(set(logged)) > 2  # steps differ (different samples): a constant per-step guess would not pass


def test_fit_to_budget_lengthens_only_the_last_stage(data_root, tmp_path):
    from monovlm.train.budget import FlopsPlanner

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
