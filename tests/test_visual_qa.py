"""The visual QA objective: a head answering the data's short questions from the embedder's visual tokens."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from monovlm.config import ConfigError, VisionConfig
from monovlm.data.datasets import DatasetError
from monovlm.data.images import image_to_tensor, load_image
from monovlm.model.align import HiddenCapture
from monovlm.model.embedders import build_embedder
from monovlm.train.build import build_model
from monovlm.train.dry_run import dry_run
from monovlm.train.parts import part_of
from monovlm.train.recipe import describe_recipe, load_recipe, recipe_from_dict
from monovlm.train.trainer import TrainOptions, train
from monovlm.train.visual_qa import (grid_states, grid_tokens, visual_qa_data, visual_qa_head,
                                     visual_qa_loss)

from image_folder import write_colour_qa

VISION = VisionConfig(embedder="conv", patch_size=8, merge=1, embedder_width=16, max_pixels=32 * 32)


def write_user_qa(root, n=48, seed=0):
    """A user's LLaVA QA folder: plain PNGs of a red or blue square, one record per question, no side files."""
    return write_colour_qa(root, n, seed, multi_turn=False)


@pytest.fixture(scope="module")
def user_qa(tmp_path_factory):
    return write_user_qa(tmp_path_factory.mktemp("user_qa"))


def test_each_step_draws_its_own_images_with_all_their_questions(user_qa):
    data = visual_qa_data(user_qa, ["qa.json"], VISION, images_per_batch=6, seed=0)
    assert data.task.answers[0] == "yes" and set(data.task.answers) == {"yes", "red", "blue"}
    batch = data.batch(global_step=3)
    again = visual_qa_data(user_qa, ["qa.json"], VISION, images_per_batch=6, seed=0).batch(global_step=3)
    assert torch.equal(batch.pixels, again.pixels) and torch.equal(batch.targets, again.targets)  # resumable
    for other in (data.batch(4), data.batch(3, micro_batch=1), data.batch(3, rank=1)):
        assert not torch.equal(batch.pixels, other.pixels)
    assert batch.pixels.shape == (6, 3, 32, 32) and batch.owner.tolist() == [i for i in range(6) for _ in range(2)]
    # the pixels are the model's own input for that file, exactly
    first = data.task.images[0]
    assert torch.equal(data.pixels(0), image_to_tensor(load_image(first.path), VISION))
    # each image's colour question is answered with the colour its pixels show
    mean, std = (torch.tensor(values).view(3, 1) for values in (VISION.image_mean, VISION.image_std))
    colour_rows = batch.targets != data.task.answer_index["yes"]
    for image, target in zip(batch.owner[colour_rows].tolist(), batch.targets[colour_rows].tolist()):
        red, _, blue = (batch.pixels[image].flatten(1) * std + mean).amax(dim=1).tolist()
        assert data.task.answers[target] == ("red" if red > blue else "blue")


def test_an_unreadable_image_is_skipped_and_counted(tmp_path):
    root = write_user_qa(tmp_path / "data", n=4)
    (root / "images/1.png").write_bytes(b"not a png")
    data = visual_qa_data(root, ["qa.json"], VISION, images_per_batch=4, seed=0)
    batch = data.batch(0)
    assert batch.pixels.shape[0] == 3 and batch.owner.max() == 2
    assert data.skipped.skipped == 1 and "image unreadable" in data.skipped.summary()


def test_the_head_reads_the_colour_from_the_embedders_tokens(user_qa):
    data = visual_qa_data(user_qa, ["qa.json"], VISION, images_per_batch=8, seed=0)
    torch.manual_seed(0)
    embedder = build_embedder(VISION, 32)
    head = visual_qa_head(32, data, seed=0)
    optimizer = torch.optim.AdamW([*embedder.parameters(), *head.parameters()], lr=3e-3)
    first = None
    for step in range(60):
        loss = visual_qa_loss(SimpleNamespace(embedder=embedder), head, data.batch(step))  # depth 0: the embedder
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = loss.item()
            grids = {name for name, p in embedder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert grids == {name for name, _ in embedder.named_parameters()} - {"cls_token", "row_separator"}
        optimizer.step()
    test = visual_qa_data(write_user_qa(user_qa.parent / "held_out", n=16, seed=1), ["qa.json"], VISION,
                          images_per_batch=16, seed=0)
    batch = test.batch(0)
    with torch.no_grad():
        grid = grid_tokens(embedder, batch.pixels)  # (16, 16, 32): the 4×4 grid of each image
        assert grid.shape == (16, 16, 32)
        predicted = head(grid[batch.owner], batch.ids, batch.lengths).argmax(-1)
    answers = [test.task.answers[i] for i in batch.targets.tolist()]
    colour = [i for i, answer in enumerate(answers) if answer != "yes"]
    # the held-out folder's own classes: map the trained head's classes by name
    names = [data.task.answers[i] for i in predicted.tolist()]
    correct = sum(names[i] == answers[i] for i in colour)
    assert correct >= 0.9 * len(colour), (correct, len(colour))  # blind: half
    assert loss.item() < 0.3 * first


def user_recipe(*stages):
    return recipe_from_dict({
        "name": "user-qa", "seed": 0,
        "model": {"vocab_size": 300,
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 1, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "visual_qa": {"weight": 0.5, "images": 4},
        "stages": [{"data": "qa.json", "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, **stage} for stage in stages],
    })


def user_options(recipe, data_root, run_dir, **more):
    return TrainOptions(recipe=recipe, data_root=data_root, run_dir=run_dir, progress=False, measure_peak=False,
                        eval_limit=4, eval_data="qa.json", dtype="float32", **more)


def test_the_head_trained_with_the_model_resumes_exactly_and_is_not_saved_with_it(user_qa, tmp_path):
    recipe = user_recipe({"name": "qa", "steps": 6, "save_every": 3, "train": ["embedder", "decoder"],
                          "visual_qa": True})
    assert recipe.stages[0].train == ["embedder", "decoder", "visual_qa"]

    def options(run_dir, **more):
        return user_options(recipe, user_qa, run_dir, **more)

    full = train(options(tmp_path / "full"))
    metrics = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "visual_qa" in m]
    assert len(steps) == 6 and all(m["visual_qa"] > 0 for m in steps)
    assert all(abs(m["loss"] - m["ce"] - m["align"] - 0.5 * m["visual_qa"]) < 1e-5 for m in steps)
    interrupted = train(options(tmp_path / "cut", stop_after=4))
    assert interrupted.losses == full.losses[:4]
    resumed = train(options(tmp_path / "cut", resume=True))  # from the checkpoint at step 3
    assert resumed.losses == full.losses[3:]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    with safe_open(str(full.final_dir / "model.safetensors"), "pt") as weights:
        assert not any("visual_qa" in key for key in weights.keys())
    # without the objective the same recipe trains other weights: the head's gradient reached the embedder
    recipe.stages[0].visual_qa = False
    plain = train(options(tmp_path / "plain"))
    assert plain.losses[0] != full.losses[0]
    assert not torch.equal(plain.model.state_dict()["embedder.patch_conv.weight"],
                           full.model.state_dict()["embedder.patch_conv.weight"])


def test_a_visual_qa_only_stage_trains_the_embedder_and_leaves_the_decoder(user_qa, tmp_path):
    recipe = user_recipe({"name": "look", "steps": 3, "train": ["embedder", "decoder"], "visual_qa": True,
                          "lm_weight": 0.0},
                         {"name": "qa", "steps": 2, "train": ["embedder", "decoder"]})
    first = train(user_options(recipe, user_qa, tmp_path / "first", stop_after=3))
    torch.manual_seed(recipe.seed)  # as the trainer does before it builds the model
    built = build_model(recipe, user_qa, progress=False)[0].state_dict()
    trained = first.model.state_dict()
    assert all(torch.equal(trained[name], built[name]) for name in built if name.startswith("decoder."))
    assert not torch.equal(trained["embedder.patch_conv.weight"], built["embedder.patch_conv.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "first/metrics.jsonl").read_text().splitlines()]
    assert [m["ce"] for m in metrics] == [0.0] * 3 and all(m["visual_qa"] > 0 and m["flops"] == 0 for m in metrics)
    assert first.evals == []  # nothing answers yet: no eval
    notes = dry_run(recipe, dtype="float32").notes
    assert any("visual QA (look)" in note for note in notes)
    assert any("stage 'look' is visual QA only" in note for note in notes)
    with pytest.raises(ConfigError, match="leaves no loss"):
        user_recipe({"name": "none", "lm_weight": 0.0})


def test_the_head_can_read_the_decoders_image_states_at_a_depth(user_qa):
    recipe = user_recipe({"name": "qa", "visual_qa": True})
    model = build_model(recipe, user_qa, progress=False)[0]
    data = visual_qa_data(user_qa, ["qa.json"], model.config.vision, images_per_batch=4, seed=0)
    head = visual_qa_head(32, data, seed=0)
    batch = data.batch(0)
    with HiddenCapture(model.decoder, [1]) as captured:  # the image's placeholders alone, as the objective reads it
        layout = model.embedder.token_layout(batch.pixels[0])
        ids = torch.full((4, layout.num_tokens), model.image_token_id)
        model.hidden_states(ids, list(batch.pixels), torch.ones_like(ids))
    assert torch.allclose(grid_states(model, batch.pixels, 1), captured.states[0][:, layout.patch_index])
    assert torch.equal(grid_states(model, batch.pixels, 0), grid_tokens(model.embedder, batch.pixels))
    visual_qa_loss(model, head, batch, depth=1).backward()
    moved = {name.split(".")[0] + "." + name.split(".")[2] if name.startswith("decoder.layers") else name.split(".")[0]
             for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"embedder", "decoder.0"}  # block 1 is read; block 2 and the output head are not
    recipe.visual_qa.depth = 3
    with pytest.raises(ConfigError, match="depth = 3: the decoder has 2 blocks"):
        train(user_options(recipe, user_qa, user_qa.parent / "too-deep"))


def test_visual_qa_settings_and_data_are_checked(tmp_path):
    assert part_of("visual_qa_head.film.weight") == "visual_qa"
    stage = {"name": "qa", "data": "qa.json", "visual_qa": True}
    with pytest.raises(ConfigError, match=r"\[visual_qa\] weight=-1"):
        recipe_from_dict({"name": "r", "visual_qa": {"weight": -1.0}, "stages": [stage]})
    with pytest.raises(ConfigError, match="unknown key"):
        recipe_from_dict({"name": "r", "visual_qa": {"images_per_step": 4}, "stages": [stage]})
    recipe = load_recipe("eve-vqa", ["visual_qa.weight=0.25", "stages.*.visual_qa=true"])
    assert recipe.visual_qa.weight == 0.25
    assert "visual QA loss ×0.25" in describe_recipe(recipe) and "visual_qa.images = 16" in describe_recipe(recipe)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images/a.png")
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "images/a.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a plain black picture with nothing in it"}]}]))
    with pytest.raises(DatasetError, match="visual_qa objective.*captions.json have none"):
        visual_qa_data(tmp_path, ["captions.json"], VISION, images_per_batch=4, seed=0)
