"""Recipes: the data files named once and checked before training, `--set` overrides (typed, validated, recorded),
the recipe a run recorded guarding `--resume`, and every generic recipe training on a plain LLaVA-format folder."""

import json

import pytest
from PIL import Image, ImageDraw

from monovlm.cli import main
from monovlm.config import ConfigError
from monovlm.train.recipe import (
    describe_recipe,
    load_recipe,
    recipe_differences,
    recipe_from_dict,
    recipe_to_dict,
    resolve_data,
    shipped_recipes,
)

GENERIC = ["eve", "evev2", "mono-internvl", "neo", "breen", "hovle", "solo", "llava"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}


def write_user_folder(root, n=24, captions=True):
    """A LLaVA-format folder as a user has one, not written by `monovlm data synth`: images of several sizes in
    images/, captions.json (one caption per image) and instruct.json (two-turn conversations); no scenes.json."""
    (root / "images").mkdir(parents=True)
    caption_records, instruct_records = [], []
    for i in range(n):
        colour, rgb = list(COLOURS.items())[i % len(COLOURS)]
        kind = "square" if i % 3 else "circle"
        size = (32, 32) if i % 2 else (48, 32)
        image = Image.new("RGB", size, (245, 245, 245))
        box = (4 + i % 5, 6, 22 + i % 5, 24)
        (ImageDraw.Draw(image).rectangle if kind == "square" else ImageDraw.Draw(image).ellipse)(box, fill=rgb)
        name = f"images/{i:03d}.png"
        image.save(root / name)
        caption_records.append({"id": f"c{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"A {colour} {kind} on a grey ground."}]})
        instruct_records.append({"id": f"q{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "What kind of shape is it?"}, {"from": "gpt", "value": kind}]})
    if captions:
        (root / "captions.json").write_text(json.dumps(caption_records))
    (root / "instruct.json").write_text(json.dumps(instruct_records))
    return root


def write_hf_llm(folder):
    """A tiny Llama-architecture HF folder (config.json, model.safetensors, tokenizer.json) as `model.init` reads."""
    from monovlm.config import DecoderConfig
    from monovlm.model.decoder import Decoder
    from monovlm.model.hf import save_hf_decoder
    from monovlm.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([f"A {c} {k} on a grey ground. {c} {k}" for c in COLOURS
                                     for k in ("square", "circle")] * 5, vocab_size=300)
    tokenizer.save(folder)
    save_hf_decoder(Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                                          num_layers=2, num_heads=2, num_kv_heads=1, eos_token_id=tokenizer.eos_id)),
                    folder)
    return folder


def tiny_overrides(name, hf_init=False):
    """--set values that shrink a shipped recipe to a few seconds of training (only keys the recipe has tables for,
    so that no table is added: an [model.encoder] would turn an encoder-free recipe into the baseline). With
    `hf_init` the decoder is the HF folder's: its shape is not set."""
    recipe = load_recipe(name)
    values = ["stages.*.steps=2", "stages.*.batch_size=4", "stages.*.warmup_steps=1"]
    if not hf_init:
        layers = 2 + recipe.model.decoder.get("pre_buffer_layers", 0)  # the LLM's 2 after any pre-buffer
        values += ["model.vocab_size=300", "model.decoder.hidden_size=32", "model.decoder.intermediate_size=64",
                   f"model.decoder.num_layers={layers}", "model.decoder.num_heads=2", "model.decoder.num_kv_heads=1"]
    if recipe.model.vision.get("embedder") in ("eve", "conv"):
        values.append("model.vision.embedder_width=16")
    if recipe.model.encoder is not None:
        values += ["model.encoder.width=16", "model.encoder.depth=1", "model.encoder.heads=2", "model.encoder_steps=2"]
    if recipe.align is not None:
        values += ["align.teacher_steps=2", "align.teacher_width=16", "align.teacher_depth=1", "align.teacher_heads=2",
                   "align.heads=2", "align.whiten_images=8"]
    return values


def train_args(name, data, out, overrides=(), hf_init=False):
    args = ["train", name, "--data", str(data), "--out", str(out), "--no-progress", "--no-eval", "--dtype", "float32"]
    for value in [*tiny_overrides(name, hf_init), *overrides]:
        args += ["--set", value]
    return args


# ---------------------------------------------------------------------------------------------------------------
# the shipped recipes


def test_the_generic_recipes_read_only_the_two_data_files_and_no_synthetic_labels():
    for name in GENERIC:
        recipe = load_recipe(name)
        files = {file for stage in recipe.stages for file, _, _ in stage.data_files}
        assert files <= {"captions.json", "instruct.json"} and "instruct.json" in files, (name, files)
        assert recipe.model.encoder_init != "labels", name  # scenes.json's pixel labels
        if recipe.align is not None:
            assert recipe.align.teacher_objective != "labels", name
    caption_stages = {name: [s.name for s in load_recipe(name).stages if s.data == "captions.json"] for name in GENERIC}
    assert caption_stages == {"eve": ["prealign", "pretrain"], "evev2": ["prealign", "perception"],
                              "mono-internvl": ["concept"], "neo": ["pretrain", "midtrain"],
                              "breen": ["prealign", "pretrain"], "hovle": ["distill", "align"], "solo": [],
                              "llava": ["align"]}


def test_eve_synthetic_is_the_quickstarts_recipe():
    """The quickstart's recipe, moved from `eve`: its stages, files, lengths and teacher are pinned here (the shipped
    model and BENCHMARKS.md were made with exactly these)."""
    recipe = load_recipe("eve-synthetic")
    assert [(s.name, s.data, s.steps, s.lr, s.batch_size, s.template) for s in recipe.stages] == [
        ("prealign", "captions.json", 400, 2e-3, 32, "plain"),
        ("pretrain", "captions.json", 400, 1e-3, 32, "plain"),
        ("colours", "colour_train.json", 300, 1e-3, 32, "chatml"),
        ("existence", "existence_train.json", 200, 1e-3, 32, "chatml"),
        ("instruct", ["instruct_train_no_existence.json", "existence_train.json"], 600, 1e-3, 32, "chatml"),
    ]
    instruct = recipe.stages[-1]
    assert (instruct.repeat, instruct.group_by_image, instruct.loss_norm) == ([2, 1], [True, False], "sample")
    assert all(stage.align for stage in recipe.stages)
    align = recipe.align
    assert (align.teacher, align.teacher_objective, align.teacher_steps, align.teacher_patch_size, align.whiten) == (
        "vit", "labels", 1200, 8, True)
    llava = load_recipe("llava-synthetic")
    assert llava.model.encoder_init == "labels"
    assert [s.data for s in llava.stages[1:]] == [s.data for s in recipe.stages[2:]]  # the same drills and mixture


def test_every_recipe_describes_its_files_stages_and_keys():
    for name in shipped_recipes():
        recipe = load_recipe(name)
        text = describe_recipe(recipe)
        for stage in recipe.stages:
            assert stage.name in text and "stages.NAME.KEY (NAME: " in text
        for key in ("data.captions", "data.no_captions", "model.init", "seed", "steps (int)"):
            assert key in text, (name, key)
        assert ("align.teacher = " in text) == (recipe.align is not None)


# ---------------------------------------------------------------------------------------------------------------
# [data] and the stages' references to it


def stage_values(**values):
    return {"name": "s", "data": "{captions}", "template": "plain", "train": ["embedder"], **values}


def test_stages_name_the_data_tables_files():
    data = {"captions": "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "captions_image_root": "LLaVA-Pretrain/images",
            "instruct": "llava_v1_5_mix665k.json"}
    recipe = recipe_from_dict({"name": "r", "data": data, "stages": [
        stage_values(), stage_values(name="t", data=["{instruct}", "extra.json"]),
        stage_values(name="u", data="{captions}", image_root="x")]})
    assert recipe.stages[0].data == data["captions"] and recipe.stages[0].image_root == "LLaVA-Pretrain/images"
    assert recipe.stages[1].data == ["llava_v1_5_mix665k.json", "extra.json"] and recipe.stages[1].image_root is None
    assert recipe.stages[2].image_root == "x"  # a stage's own wins
    with pytest.raises(ConfigError, match="different image roots"):
        recipe_from_dict({"name": "r", "data": data, "stages": [stage_values(data=["{captions}", "{instruct}"])]})
    with pytest.raises(ConfigError, match=r"'\{caption\}' names no \[data\] file.*\{captions\} or \{instruct\}"):
        recipe_from_dict({"name": "r", "stages": [stage_values(data="{caption}")]})
    with pytest.raises(ConfigError, match="no_captions='maybe'"):
        recipe_from_dict({"name": "r", "data": {"no_captions": "maybe"}, "stages": [stage_values()]})
    with pytest.raises(ConfigError, match=r"\[model.vision\]: unknown VisionConfig field\(s\) \['patch'\]"):
        recipe_from_dict({"name": "r", "model": {"vision": {"patch": 4}}, "stages": [stage_values()]})


def test_a_missing_file_is_one_error_naming_each_and_showing_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        resolve_data(load_recipe("eve"), tmp_path)
    message = str(error.value)
    assert "captions.json (read by prealign, pretrain); instruct.json (read by instruct)" in message
    assert '"conversations"' in message and "images/" in message  # the layout, with a record of each file
    assert "--set data.captions=FILE" in message and "--set data.no_captions=instruct" in message
    (tmp_path / "captions.json").write_text("[]")
    with pytest.raises(FileNotFoundError) as error:
        resolve_data(load_recipe("eve"), tmp_path)
    assert "missing instruct.json (read by instruct)." in str(error.value) and "no_captions" not in str(error.value)
    (tmp_path / "instruct.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"missing pics/ \(read by prealign, pretrain\)"):
        resolve_data(load_recipe("eve", ["data.captions_image_root=pics"]), tmp_path)
    assert resolve_data(load_recipe("eve"), tmp_path).stages[0].data == "captions.json"


def test_without_captions_the_caption_stages_read_the_instructions_or_are_skipped(tmp_path):
    (tmp_path / "instruct.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="missing captions.json"):
        resolve_data(load_recipe("eve"), tmp_path)  # the default: say so, do not guess
    told = []
    instead = resolve_data(load_recipe("eve", ["data.no_captions=instruct"]), tmp_path, log=told.append)
    assert [(s.name, s.data, s.template) for s in instead.stages] == [
        ("prealign", "instruct.json", "plain"), ("pretrain", "instruct.json", "plain"),
        ("instruct", "instruct.json", "auto")]
    assert "prealign, pretrain read instruct.json instead" in told[0]
    (tmp_path / "qa_images").mkdir()
    moved = resolve_data(load_recipe("eve", ["data.no_captions=instruct", "data.captions_image_root=pics",
                                             "data.instruct_image_root=qa_images"]), tmp_path)
    assert [s.image_root for s in moved.stages] == ["qa_images"] * 3  # the images move with the file
    skipped = resolve_data(load_recipe("eve", ["data.no_captions=skip"]), tmp_path)
    assert [s.name for s in skipped.stages] == ["instruct"]
    assert len(load_recipe("eve").stages) == 3  # the loaded recipe is not changed
    (tmp_path / "more.json").write_text("[]")
    mixture = load_recipe("eve", ["data.no_captions=skip", 'stages.pretrain.data=["{captions}", "more.json"]',
                                  "stages.pretrain.repeat=[3, 2]", "stages.pretrain.group_by_image=[true, false]"])
    pretrain = resolve_data(mixture, tmp_path).stages[0]
    assert (pretrain.name, pretrain.data, pretrain.repeat, pretrain.group_by_image) == (
        "pretrain", ["more.json"], [2], [False])
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        resolve_data(load_recipe("evev2", ["data.no_captions=skip", "stages.instruct.data={captions}"]), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# --set KEY=VALUE


def test_overrides_are_typed_and_stages_are_addressed_by_name():
    recipe = load_recipe("eve", ["stages.instruct.steps=2000", "model.init=path/to/llm",
                                 "align.teacher=hf:path/to/siglip", "stages.*.batch_size=8", "stages.prealign.lr=1",
                                 "data.captions=blip_laion_cc_sbu_558k.json", "model.decoder.num_layers=24",
                                 'stages.instruct.system_prompt="Answer briefly."', "seed=7",
                                 "stages.pretrain.align=false", "align.layers=[1, 3]"])
    instruct = recipe.stages[-1]
    assert instruct.steps == 2000 and isinstance(instruct.steps, int)
    assert recipe.model.init == "path/to/llm" and recipe.align.teacher == "hf:path/to/siglip"
    assert [s.batch_size for s in recipe.stages] == [8, 8, 8]
    assert recipe.stages[0].lr == 1.0 and isinstance(recipe.stages[0].lr, float)
    assert [s.data for s in recipe.stages[:2]] == ["blip_laion_cc_sbu_558k.json"] * 2  # through {captions}
    assert recipe.model.decoder == {"num_layers": 24}  # the HF init's shape replaces the file's; --set keys stay
    assert instruct.system_prompt == "Answer briefly." and recipe.seed == 7 and recipe.align.layers == [1, 3]
    assert not recipe.stages[1].align and recipe.stages[0].align
    assert recipe.overrides[0] == "stages.instruct.steps=2000" and len(recipe.overrides) == 11
    assert load_recipe("eve").stages[-1].steps == 600  # the file is not changed
    solo = load_recipe("solo", ["align.teacher=vit", "stages.instruct.align=true"])  # a table the recipe lacks
    assert solo.align is not None and solo.align.teacher_steps == 300 and "align" in solo.stages[0].train
    assert load_recipe("eve", ["data.captions=2024"]).data.captions == "2024"  # a string field takes bare text


@pytest.mark.parametrize("override,message", [
    ("stages.instruct.stepz=3", r"unknown stage key 'stepz'; stage keys: data, template, .*steps"),
    ("stages.finetune.steps=3", r"no stage 'finetune'; stages: prealign, pretrain, instruct \(or \* for every"),
    ("stages.steps=3", r"stages.NAME.KEY \(stages: prealign, pretrain, instruct"),
    ("stages.instruct.steps=many", r"stages.instruct.steps takes int, and 'many' is not one"),
    ("stages.instruct.steps=2.5", r"takes int"),
    ("stages.instruct.align=yes", r"takes bool"),
    ("stages.instruct.lr=fast", r"takes float"),
    ("seed=true", r"seed takes int"),
    ("modle.init=x", r"unknown key 'modle'; valid keys here: name, seed, data, model, align, visual_qa, description, "
                     r"activation_checkpointing, compile, fsdp_param_dtype, fsdp_cpu_offload, stages"),
    ("model.decoder.hidden=3", r"unknown key 'model.decoder.hidden'; valid keys here: .*model.decoder.hidden_size"),
    ("align.teachr=vit", r"unknown key 'align.teachr'; valid keys here: align.teacher, "),
    ("model=scratch", r"model is a table; set one of its keys: model.init, "),
    ("model.init.x=1", r"model.init is a value \(str\), not a table"),
    ("stages.instruct.name=x", r"unknown stage key 'name'"),
    ("steps", r"write KEY=VALUE"),
    ("stages.instruct.steps=0", r"must be positive"),  # the value's type is right; the stage checks the rest
    ("stages.instruct.data=[1, 2]", r"takes str or list\[str\]"),
])
def test_bad_overrides_are_refused_naming_the_key_and_the_valid_ones(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("eve", [override])


# ---------------------------------------------------------------------------------------------------------------
# the recorded recipe and --resume


def test_recipe_differences_name_the_keys_and_allow_stages_added_at_the_end():
    run = recipe_to_dict(load_recipe("eve", ["stages.instruct.steps=2000"]))
    assert recipe_differences(run, recipe_to_dict(load_recipe("eve", ["stages.instruct.steps=2000"]))) == []
    now = recipe_to_dict(load_recipe("eve", ["stages.instruct.steps=100", "align.teacher=hf:x"]))
    assert recipe_differences(run, now) == ['align.teacher: "vit" in the run, "hf:x" now',
                                            "stages.instruct.steps: 2000 in the run, 100 now"]
    longer = load_recipe("eve", ["stages.instruct.steps=2000"])
    longer.stages.append(longer.stages[-1])
    assert recipe_differences(run, recipe_to_dict(longer)) == []
    shorter = load_recipe("eve", ["stages.instruct.steps=2000"])
    shorter.stages = shorter.stages[:2]
    assert recipe_differences(run, recipe_to_dict(shorter)) == [
        "stages: the run has stage 'instruct' (number 3), the recipe now ends before it"]


@pytest.mark.slow  # training runs through the CLI
def test_training_on_a_user_folder_records_the_recipe_and_resume_refuses_other_overrides(tmp_path, capsys):
    data = write_user_folder(tmp_path / "mine")
    run = tmp_path / "run"
    assert main(train_args("solo", data, run, ["stages.instruct.save_every=1"]) + ["--stop-after", "1"]) == 0
    recorded = json.loads((run / "recipe.json").read_text())
    assert recorded["stages"][0]["data"] == "instruct.json" and recorded["stages"][0]["steps"] == 2
    assert recorded["overrides"][0] == "stages.*.steps=2" and "stages.instruct.save_every=1" in recorded["overrides"]
    capsys.readouterr()
    refused = train_args("solo", data, run, ["stages.instruct.save_every=1", "stages.instruct.lr=0.01"])
    assert main(refused + ["--resume"]) == 2
    error = capsys.readouterr().err
    assert "cannot resume" in error and "stages.instruct.lr: 0.001 in the run, 0.01 now" in error
    assert main(train_args("solo", data, run, ["stages.instruct.save_every=1"]) + ["--resume"]) == 0
    assert json.loads((run / "final" / "recipe.json").read_text()) == recorded  # the model knows what made it
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # resumed after step 1, not from the start


def test_model_init_on_the_command_line_replaces_the_recipes_scratch_decoder(tmp_path):
    """`--set model.init=PATH` on a recipe whose file shapes a scratch decoder: the HF model's own config wins (the
    file's [model.decoder] shape keys give way; the keys about visual tokens and keys set on the command line stay)."""
    assert load_recipe("eve", ["model.init=llm"]).model.decoder == {}
    assert load_recipe("evev2", ["model.init=llm"]).model.decoder == {
        "expert_norms": True, "expert_attention": True, "expert_mlp": True}
    assert load_recipe("eve", ["model.decoder.num_layers=3", "model.init=llm"]).model.decoder == {"num_layers": 3}
    assert load_recipe("eve").model.decoder["num_layers"] == 4
    llm = write_hf_llm(tmp_path / "llm")
    data = write_user_folder(tmp_path / "mine")
    visual = ["model.decoder.visual_position_step=0.25", "model.decoder.image_attention=bidirectional",
              "model.decoder.pre_buffer_layers=1"]
    assert load_recipe("eve", ["model.init=llm", *visual]).model.decoder == {
        "visual_position_step": 0.25, "image_attention": "bidirectional", "pre_buffer_layers": 1}
    assert main(train_args("solo", data, tmp_path / "run", [f"model.init={llm}", *visual], hf_init=True)) == 0
    decoder = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["decoder"]
    assert decoder["hidden_size"] == 48  # the HF model's shape, not the recipe's
    assert (decoder["visual_position_step"], decoder["image_attention"]) == (0.25, "bidirectional")  # on top of it
    assert (decoder["num_layers"], decoder["pre_buffer_layers"]) == (2 + 1, 1)  # one fresh layer before the LLM's 2


@pytest.mark.parametrize("name,added,native_rope", [("neo", 1, True), ("hovle", 2, False), ("breen", 0, False)])
def test_the_family_switches_leave_a_loaded_llms_text_logits_unchanged(tmp_path, name, added, native_rope):
    """On an HF LLM — `neo`: a pre-buffer layer in front, native RoPE's h/w projections, bidirectional image
    attention; `hovle`: the holistic embedding's layers in front; `breen`: image-expert FFNs — before training, text
    goes through them exactly as through the LLM alone."""
    import torch

    from monovlm.model.hf import load_hf_decoder
    from monovlm.train.build import build_model

    llm = write_hf_llm(tmp_path / "llm")
    recipe = load_recipe(name, [f"model.init={llm}"])
    model, tokenizer = build_model(recipe, write_user_folder(tmp_path / "mine"))
    plain = load_hf_decoder(llm).eval()
    config = model.decoder.config
    assert (config.num_layers, config.pre_buffer_layers, config.native_rope) == (
        plain.config.num_layers + added, added, native_rope)
    ids = torch.tensor([tokenizer.encode("A red square on a grey ground.")])
    with torch.no_grad():
        ours = model.eval()(ids)[..., : plain.config.vocab_size]
        assert (ours - plain(ids)).abs().max().item() <= 1e-5


@pytest.mark.slow  # a training run per recipe
@pytest.mark.parametrize("name,overrides", [
    ("eve", []), ("evev2", []), ("mono-internvl", []), ("neo", []), ("breen", []), ("hovle", []), ("solo", []),
    ("llava", []),
    ("eve", ["data.no_captions=instruct"]),  # QA data only
    ("eve-vqa", []),  # short-answer QA data, no captions: the teacher learns the answers
    ("eve-vqa", ["align.teacher_questions=4", "stages.instruct.teacher_questions=true"]),  # and asks more
    ("eve-vqa", ["align.teacher_head=film", "stages.open.look=0", "stages.instruct.look=0"]),  # without look
])
def test_every_generic_recipe_trains_on_a_user_folder(name, overrides, tmp_path):
    """The default teacher / encoder init included: nothing here was written by `monovlm data synth`."""
    captions = "data.no_captions=instruct" not in overrides and name != "eve-vqa"
    data = write_user_folder(tmp_path / "mine", captions=captions)
    asks = "align.teacher_questions=4" in overrides
    if asks:  # yes/no questions for the teacher to ask of the other images: "Is the shape red?" of a blue one
        records = json.loads((data / "instruct.json").read_text())
        for i, record in enumerate(records):
            colour = list(COLOURS)[i % 3]
            answer = "yes" if record["conversations"][1]["value"] == colour else "no"
            record["conversations"] += [{"from": "human", "value": f"Is the shape {colour}?"},
                                        {"from": "gpt", "value": answer}]
        (data / "instruct.json").write_text(json.dumps(records))
    assert main(train_args(name, data, tmp_path / "run", overrides)) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    assert len(losses) == 2 * len(load_recipe(name).stages)
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in losses)  # finite, positive
    if load_recipe(name).align is not None:
        assert any(m["align"] > 0 for m in losses)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    if name == "eve-vqa" and "stages.open.look=0" not in overrides:  # the lookup head the look loss read; its log
        assert (tmp_path / "run" / "teacher" / "qa_head.safetensors").is_file()
        assert all(m["look"] > 0 for m in losses)
    if asks:  # what the tiny teacher answers is tests/test_teacher_questions.py's; here: written where stages read
        asked = json.loads((tmp_path / "run" / "teacher" / "questions.json").read_text())
        own = {record["image"]: {turn["value"] for turn in record["conversations"]}
               for record in json.loads((data / "instruct.json").read_text())}
        assert isinstance(asked, list) and all(record["image"] in own for record in asked)


@pytest.mark.slow  # a training run per recipe
@pytest.mark.parametrize("name", ["neo", "breen", "hovle", "mono-internvl"])
def test_the_family_recipes_train_on_synthetic_data(name, tmp_path):
    """`monovlm data synth` data: its captions.json and instruct.json, as the recipes name them."""
    from monovlm.quickstart import ensure_data

    data = tmp_path / "synth"
    ensure_data(data, n=24, seed=0, progress=False)
    assert main(train_args(name, data, tmp_path / "run")) == 0
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in losses if "loss" in m]) == 2 * len(load_recipe(name).stages)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_eve_trains_on_a_user_folder_from_an_hf_llm_with_an_hf_teacher(tmp_path):
    """The README's cluster command at toy size: `--set model.init=LLM --set align.teacher=hf:SIGLIP`."""
    transformers = pytest.importorskip("transformers")
    teacher = tmp_path / "siglip"
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)).save_pretrained(teacher)
    llm = write_hf_llm(tmp_path / "llm")
    data = write_user_folder(tmp_path / "mine")
    assert main(train_args("eve", data, tmp_path / "run", [f"model.init={llm}", f"align.teacher=hf:{teacher}"],
                           hf_init=True)) == 0
    recorded = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recorded["align"]["teacher"] == f"hf:{teacher}" and recorded["model"]["init"] == str(llm)
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("align", 0) > 0 for m in losses)
