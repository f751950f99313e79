"""Seeing the plateau while training: model vs blind per answer type, and the warning for a type answered no better
than with a blank image (a model that ignores the image triggers it; the shipped model does not)."""

import json

import pytest
import torch

from monovlm.eval.qa import QAResult, blind_gaps, evaluate_qa, samples_from_records
from monovlm.train.recipe import recipe_from_dict
from monovlm.train.trainer import TrainOptions, train

from image_folder import write_llava_folder


def result(group_of_id: dict[str, str], predictions: dict[str, str], truth: dict[str, str]) -> QAResult:
    rows = [{"id": i, "group": group_of_id[i], "prediction": predictions[i], "score": float(predictions[i] == truth[i])}
            for i in group_of_id]
    groups = sorted(set(group_of_id.values()))
    accuracy = {g: sum(r["score"] for r in rows if r["group"] == g) / sum(r["group"] == g for r in rows) for g in groups}
    return QAResult(accuracy, {g: sum(r["group"] == g for r in rows) for g in groups}, rows)


def test_blind_gaps_flags_the_type_answered_as_with_a_blank_image():
    ids = [str(i) for i in range(40)]
    group = {i: "yes/no" if int(i) < 20 else "other" for i in ids}
    truth = {i: ("yes" if int(i) % 4 else "no") if int(i) < 20 else f"shape{int(i) % 5}" for i in ids}
    blind = {i: "yes" if int(i) < 20 else "shape0" for i in ids}  # the wording's prior
    model = {i: "yes" if int(i) < 20 else truth[i] for i in ids}  # yes/no from the prior, shapes from the image
    gaps = {gap.group: gap for gap in blind_gaps(result(group, model, truth), result(group, blind, truth))}
    assert gaps["yes/no"].model == gaps["yes/no"].blind == 0.75
    assert gaps["yes/no"].same_answers == 1.0 and gaps["yes/no"].noise == 0.0 and not gaps["yes/no"].looks
    assert gaps["other"].model == 1.0 and gaps["other"].blind == 0.2 and gaps["other"].looks
    # paired noise: differences are 1 on 16 questions, 0 on 4 -> variance 0.8 - 0.64 = 0.16; 2 * sqrt(0.16 / 20)
    assert gaps["other"].noise == pytest.approx(2 * (0.16 / 20) ** 0.5)
    assert "<- at blind" in gaps["yes/no"].line() and "<- at blind" not in gaps["other"].line()
    assert gaps["yes/no"].line(trained=False).endswith("(not trained in this stage)")


def test_records_without_a_category_are_grouped_by_answer_type(tmp_path):
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                    {"from": "gpt", "value": answer}]}
               for answer in ("Yes", "two", "a red star")]
    records.append({**records[0], "category": "existence"})
    assert [s.category for s in samples_from_records(records, tmp_path)] == ["yes/no", "number", "other", "existence"]


def tiny_recipe():
    stage = dict(batch_size=4, warmup_steps=1, max_length=200, lr=3e-3)
    return recipe_from_dict({
        "name": "tiny", "seed": 0,
        "model": {"vocab_size": 300,
                  "decoder": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "tie_word_embeddings": True},
                  "vision": {"embedder": "conv", "patch_size": 8, "merge": 2, "embedder_width": 16,
                             "max_pixels": 32 * 32}},
        "stages": [{"name": "qa", "data": "qa.json", "template": "chatml", "train": ["embedder", "decoder"],
                    "steps": 4, "blind_check": 0.5, **stage}],
    })


def test_the_trainer_compares_with_blind_on_training_questions_and_warns(tmp_path, capsys):
    data = write_llava_folder(tmp_path / "data", n=16)  # every answer is "yes": nothing to learn from the image
    train(TrainOptions(recipe=tiny_recipe(), data_root=data, run_dir=tmp_path / "run", progress=False,
                       measure_peak=False, dtype="float32", eval_data="instruct_test.json"))
    out = capsys.readouterr().out
    assert "no periodic eval" in out  # the named eval file is missing: said once, then the training questions serve
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval" in json.loads(line)]
    assert [e["global_step"] for e in evals] == [2, 4]  # the blind check at half the stage, and the stage's end
    assert all(e["eval_on"] == "16 training questions of qa.json" and "yes/no" in e["blind"] for e in evals)
    assert out.count("WARNING: stage 'qa'") == 2 and "yes/no answered no better than with a blank image" in out


def test_a_stage_without_yes_no_questions_is_not_warned_of_them(tmp_path, capsys):
    from image_folder import write_colour_qa

    data = write_colour_qa(tmp_path / "data", n=16, multi_turn=False)  # "What colour ...?" and "Is there a square?"
    recipe = tiny_recipe()
    recipe.stages[0].yes_no = "open"  # trains the colour questions only
    train(TrainOptions(recipe=recipe, data_root=data, run_dir=tmp_path / "run", progress=False,
                       measure_peak=False, dtype="float32", eval_data="instruct_test.json"))
    out = capsys.readouterr().out
    yes_no_lines = [line for line in out.splitlines() if line.strip().startswith("yes/no")]
    assert len(yes_no_lines) == 2 and all(line.endswith("(not trained in this stage)") for line in yes_no_lines)
    assert not any("yes/no" in line for line in out.splitlines() if line.startswith("WARNING"))


@pytest.fixture(scope="module")
def synthetic_test(tmp_path_factory):
    from monovlm.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=4000, seed=0, progress=False)  # the shipped model's data: its held-out questions
    records = json.loads((root / "instruct_test.json").read_text())[:400]
    for record in records:  # as a user's data: grouped by answer type (yes/no, number, other)
        record.pop("category")
    return root, records


@pytest.mark.slow
def test_the_shipped_model_looks_and_one_that_ignores_the_image_does_not(synthetic_test):
    from monovlm.eval.protocol import ModelRunner
    from monovlm.paths import DEFAULT_MODEL_DIR

    root, records = synthetic_test
    runner = ModelRunner.load(DEFAULT_MODEL_DIR)
    model, processor = runner.model, runner.processor

    def gaps(questions):
        return blind_gaps(evaluate_qa(model, processor, questions, root),
                          evaluate_qa(model, processor, questions, root, blank=True))

    shipped = gaps(records)
    assert [gap.group for gap in shipped] == ["number", "other", "yes/no"]
    assert all(gap.looks for gap in shipped), [gap.line() for gap in shipped]
    with torch.no_grad():  # every image now gives the same visual tokens: the model cannot see
        for parameter in model.embedder.parameters():
            parameter.zero_()
    blind_model = gaps(records[:100])
    assert not any(gap.looks for gap in blind_model), [gap.line() for gap in blind_model]
    assert all(gap.same_answers == 1.0 for gap in blind_model)


def test_eval_records_follow_the_readers_one_image_path_rule(tmp_path):
    from monovlm.data.datasets import SkipReport

    (tmp_path / "data").mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "outside.png")  # a link out of the image folder
    question = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "yes"}]
    records = [{"id": name, "image": name, "conversations": question} for name in ("in.png", "link.png", "../x.png")]
    skipped = SkipReport()
    samples = samples_from_records(records, tmp_path / "data", skipped)
    assert [s.id for s in samples] == ["in.png"] and samples[0].image == (tmp_path / "data" / "in.png").resolve()
    assert skipped.skipped == 2 and skipped.reasons == {"image path escapes root": 2}
