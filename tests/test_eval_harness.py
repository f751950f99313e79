"""The evaluation harness: the model protocol, tasks as data, the blind baseline, reports, compare, lmms adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from monovlm.cli import main
from monovlm.config import ConfigError
from monovlm.data.synthetic import synthesize
from monovlm.eval.harness import OVERALL, TaskResult, run_task
from monovlm.eval.lmms import MonovlmLMMS
from monovlm.eval.metrics import answer_type
from monovlm.eval.protocol import LoglikelihoodRequest, ModelRunner, Query
from monovlm.eval.qa import evaluate_qa
from monovlm.eval.report import (
    EvalRun,
    compare_table,
    evaluate_model,
    limit_per_group,
    load_runs,
    markdown,
    write_report,
)
from monovlm.eval.run import run_eval
from monovlm.eval.samples import EvalSample
from monovlm.eval.tasks import load_task, shipped_tasks
from monovlm.infer.generate import GenerationConfig
from monovlm.paths import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.load(DEFAULT_MODEL_DIR, batch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(root, n=120, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def test_records(data) -> list[dict]:
    return json.loads((data / "instruct_test.json").read_text())


def _image(runner, data, record):
    return runner.load_image(data / record["image"])


# -------------------------------------------------------------------------------------------------------------------
# the model protocol


def test_loglikelihood_is_the_summed_log_probability_of_the_continuation(runner, data, test_records):
    record = test_records[0]
    image = _image(runner, data, record)
    request = LoglikelihoodRequest(record["question"], record["answer"], [image])
    (value, _), = runner.loglikelihood([request])
    # by hand: one unpadded forward over context + continuation, log-softmax, pick the continuation's tokens
    context, tensors = runner.processor.prompt(record["question"], [image])
    continuation = runner.tokenizer.encode(record["answer"])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = F.log_softmax(runner.model(ids, images=tensors).float(), dim=-1)[0]
    expected = sum(float(log_probs[len(context) + i - 1, token]) for i, token in enumerate(continuation))
    assert value == pytest.approx(expected, abs=1e-4)
    assert value < 0  # a log-probability, not a (positive) mean loss


def test_loglikelihood_batched_with_padding_equals_one_at_a_time_and_picks_the_likely_option(runner, data,
                                                                                            test_records):
    records = test_records[:5]
    requests = [LoglikelihoodRequest(r["question"], r["answer"], [_image(runner, data, r)]) for r in records]
    requests.append(LoglikelihoodRequest("Is there a red circle in the image?", "no, there is not", []))
    together = runner.loglikelihood(requests)
    alone = [runner.loglikelihood([r])[0] for r in requests]
    for (a, greedy_a), (b, greedy_b) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4)
        assert greedy_a == greedy_b
    # the greedy answer is "greedy" and at least as likely as any other candidate
    record = records[0]
    image = _image(runner, data, record)
    greedy_text = runner.generate([Query(record["question"], [image])], GenerationConfig(max_new_tokens=8))[0]
    scores = runner.loglikelihood([LoglikelihoodRequest(record["question"], text, [image])
                                   for text in (greedy_text, "purple elephant")])
    assert scores[0][1] is True
    assert scores[0][0] > scores[1][0]


def test_next_token_logits_match_the_forward_pass(runner, data, test_records):
    record = test_records[1]
    image = _image(runner, data, record)
    logits = runner.next_token_logits([Query(record["question"], [image]), Query("hello", [])])
    assert logits.shape == (2, runner.model.config.decoder.vocab_size)
    ids, tensors = runner.processor.prompt(record["question"], [image])
    with torch.no_grad():
        expected = runner.model(torch.tensor([ids]), images=tensors)[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------------------------------
# tasks


def test_shipped_tasks_load_and_bad_tasks_are_clear_errors(tmp_path):
    assert {"synthetic", "synthetic_pope"} <= set(shipped_tasks())
    for name in shipped_tasks():
        assert load_task(name).name == name
    with pytest.raises(ConfigError, match="not found"):
        load_task("no-such-task")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nreader = "llava"\nmetric = "bleu"\n')
    with pytest.raises(ConfigError, match="metric"):
        load_task(bad)
    bad.write_text('name = "x"\nreader = "llava"\nmetric = "exact_match"\ncolour = 3\n')
    with pytest.raises(ConfigError, match="unknown task keys"):
        load_task(bad)
    with pytest.raises(ConfigError, match="--data"):
        load_task("synthetic").resolved_reader_args(None)


def test_unreadable_images_are_skipped_and_counted(runner, data, test_records, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples = [EvalSample("a", r["question"], data / r["image"], [r["answer"]], r["category"]) for r in test_records[:3]]
    samples.append(EvalSample("bad", "what colour?", broken, ["red"], "attribute"))
    result = run_task(runner, load_task("synthetic"), samples)
    assert result.counts[OVERALL] == 3
    assert result.skipped == 1 and "unreadable image" in result.skip_summary


# -------------------------------------------------------------------------------------------------------------------
# the harness agrees with the trainer's eval, and reports


@pytest.mark.slow  # a training run
def test_eval_agrees_with_the_trainers_periodic_eval(runner, data, test_records):
    limit = 40
    trainer_view = evaluate_qa(runner.model, runner.processor, test_records[:limit], data)
    trainer_blind = evaluate_qa(runner.model, runner.processor, test_records[:limit], data, blank=True)
    run = evaluate_model(runner, ["synthetic"], data, limit=limit, progress=False)
    model, blind = run.results[0], run.blind[0]
    assert model.headline() == trainer_view.accuracy
    assert blind.headline() == trainer_blind.accuracy
    assert model.counts[OVERALL] == limit
    # the shipped model reads the pixels: it beats its blind self overall
    assert model.scores[OVERALL]["accuracy"] > blind.scores[OVERALL]["accuracy"]


def test_pope_task_reports_pope_metrics_from_predictions(runner, data):
    run = evaluate_model(runner, ["synthetic_pope"], data, limit=30, progress=False)
    result = run.results[0]
    assert set(result.scores) <= {"random", "popular", "adversarial", OVERALL}
    overall = result.scores[OVERALL]
    predictions = [p["prediction"] for p in result.predictions]
    assert overall["yes_ratio"] == pytest.approx(predictions.count("yes") / len(predictions))
    hits = [p["prediction"] == p["answers"][0] for p in result.predictions]
    assert overall["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_eval_command_writes_report_and_plots_and_compare_reads_them(data, tmp_path, capsys):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", "default", "--data", str(data), "--limit", "16", "--out", str(out_a), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "blind accuracy" in printed and "**overall**" in printed
    for name in ("report.json", "report.md", "synthetic_per_category.png"):
        assert (out_a / name).is_file() and (out_a / name).stat().st_size > 0
    assert (out_a / "synthetic_per_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = load_runs(out_a)
    assert runs[0].results[0].counts[OVERALL] == 16 and runs[0].blind
    assert main(["eval", "default", "--data", str(data), "--limit", "8", "--out", str(out_b), "--no-blind",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(out_a), str(out_b)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "**overall**" in line)
    overall_a = runs[0].results[0].scores[OVERALL]["accuracy"]
    assert f"{100 * overall_a:.1f}" in row
    assert main(["eval", "default", "--keep", "0.5", "--data", str(data)]) == 2  # --keep without --reduce


def test_write_report_plots_accuracy_against_tokens_kept(runner, data, tmp_path):
    base = evaluate_model(runner, ["synthetic"], data, limit=8, progress=False)
    reduced = evaluate_model(runner, ["synthetic"], data, limit=8, blind=False, progress=False,
                             setting={"reduction": "fake", "keep": 0.5})
    written = write_report([base, reduced], tmp_path)
    assert tmp_path / "synthetic_vs_tokens_kept.png" in written
    assert "fake" in compare_table([base, reduced])


# -------------------------------------------------------------------------------------------------------------------
# lmms-eval adapter (driven with fake requests shaped like lmms-eval's Instance)


@dataclass
class FakeInstance:
    args: tuple


def test_lmms_adapter_answers_fake_requests_like_the_runner(runner, data, test_records):
    docs = {i: {"image": data / r["image"], "question": r["question"], "answer": r["answer"]}
            for i, r in enumerate(test_records[:3])}
    adapter = MonovlmLMMS(runner=runner)
    adapter.task_dict = {"toy": {"test": docs}}
    to_visual = lambda doc: [runner.load_image(doc["image"])]  # noqa: E731
    generations = adapter.generate_until(
        [FakeInstance((d["question"], {"max_new_tokens": 8, "until": ["\n"]}, to_visual, i, "toy", "test"))
         for i, d in docs.items()])
    expected = runner.generate([Query(d["question"], to_visual(d)) for d in docs.values()],
                               GenerationConfig(max_new_tokens=8, stop_strings=["\n"]))
    assert generations == expected
    scores = adapter.loglikelihood(
        [FakeInstance((d["question"], lambda doc: doc["answer"], to_visual, i, "toy", "test")) for i, d in docs.items()])
    direct = runner.loglikelihood([LoglikelihoodRequest(d["question"], d["answer"], to_visual(d)) for d in docs.values()])
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in direct], abs=1e-5)
    assert all(math.isfinite(s) and s < 0 for s, _ in scores)
    with pytest.raises(ValueError, match="pretrained"):
        MonovlmLMMS()


def test_eval_with_a_reduction_sweep_plots_accuracy_against_tokens_kept(data, tmp_path, capsys):
    out = tmp_path / "reduced"
    assert main(["eval", "default", "--data", str(data), "--limit", "8", "--reduce", "uniform", "--keep", "1.0",
                 "--keep", "0.25", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    runs = load_runs(out)
    assert [r.setting for r in runs] == [{}, {"reduction": "uniform", "keep": 1.0}, {"reduction": "uniform", "keep": 0.25}]
    # keeping every token is exactly the unreduced model
    assert [p["output"] for p in runs[1].results[0].predictions] == [p["output"] for p in runs[0].results[0].predictions]
    assert (out / "synthetic_vs_tokens_kept.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "default", "--data", str(data), "--reduce", "no-such-method"]) == 2


# -------------------------------------------------------------------------------------------------------------------
# the report survives the file system


def test_eval_prints_its_tables_before_a_report_that_cannot_be_written(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as raised:
        run_eval("default", ["synthetic"], data=data, out=blocker / "report", limit=4, progress=False)
    assert str(blocker) in str(raised.value)
    printed = capsys.readouterr().out
    assert "blind accuracy" in printed and "**overall**" in printed  # the results were not lost


def _small_run(predictions: int) -> EvalRun:
    result = TaskResult("synthetic", "exact_match", "accuracy", False, {OVERALL: {"accuracy": 0.5}}, {OVERALL: 2},
                        [{"id": str(i), "output": "x" * 100} for i in range(predictions)])
    return EvalRun("tiny", {}, [result])


@pytest.mark.slow  # a child process
def test_a_full_disk_leaves_the_previous_report_whole(tmp_path):
    write_report(_small_run(2), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # a file size limit makes every write past 20 kB fail as a full disk would, in a child process only
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
from test_eval_harness import _small_run
from monovlm.eval.report import write_report
try:
    write_report(_small_run(2000), {str(tmp_path)!r})
except OSError as error:
    print("failed:", error)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "failed:" in child.stdout and "report.json" in child.stdout, child.stdout + child.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files whole, no temporary left
    assert load_runs(tmp_path)[0].results[0].predictions == _small_run(2).results[0].predictions


def _mme_release(root: Path, subtasks: dict[str, int]) -> Path:
    """A tiny MME release folder: per subtask, `n` images with MME's yes and no question each."""
    for subtask, images in subtasks.items():
        folder = root / subtask
        folder.mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text(f"Is it {i}? Please answer yes or no.\tYes\n"
                                                 f"Is it {i + 1}? Please answer yes or no.\tNo\n")
    return root


def test_mme_limit_applies_per_subtask_and_partial_totals_are_marked(runner, tmp_path):
    data = _mme_release(tmp_path / "mme", {"OCR": 3, "artwork": 3, "color": 1})
    with pytest.warns(UserWarning) as caught:
        run = evaluate_model(runner, ["mme"], data, limit=3, blind=False, progress=False)
    result = run.results[0]
    # whole images up to the limit in every subtask (a first-3 cut would have scored OCR alone)
    assert result.counts == {"OCR": 4, "artwork": 4, "color": 2, OVERALL: 10}
    assert result.scores[OVERALL]["score"] == pytest.approx(sum(result.scores[g]["score"] for g in ("OCR", "artwork",
                                                                                                       "color")))
    assert len(result.notes) == 2 and len(caught) == 2
    assert result.notes[0].startswith("--limit 3 per subtask cut 2 subtask(s) (OCR, artwork)")
    assert result.notes[1].startswith("partial totals: 3 of MME's 14 subtasks present")
    assert "**Note:** partial totals" in markdown([run])
    assert _through_json(run).results[0].notes == result.notes  # kept in report.json


def _through_json(run: EvalRun) -> EvalRun:
    return EvalRun.from_dict(json.loads(json.dumps(run.to_dict())))


def test_limit_per_group_keeps_whole_images_in_order():
    samples = [EvalSample(id=f"{c}{i}", question="q", image=None, answers=["yes"], category=c,
                          meta={"image_key": f"{c}{i // 2}"}) for c in "ab" for i in range(6)]
    kept, cut = limit_per_group(samples, 3)
    assert [s.id for s in kept] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"] and cut == ["a", "b"]
    assert limit_per_group(samples, 6) == (samples, [])


# -------------------------------------------------------------------------------------------------------------------
# the llava task on a user's file


def test_llava_task_reads_any_file_and_breaks_down_by_answer_type(data, test_records, tmp_path, capsys):
    task = load_task("llava")
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "a.json").write_text("[]")
    assert task.resolved_reader_args(folder / "a.json") == {"path": str(folder / "a.json"), "image_root": str(folder)}
    assert task.resolved_reader_args(folder)["path"] == str(folder / "a.json")  # the folder's only JSON file
    (folder / "b.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"reads .*questions\.json, which does not exist \(it holds a\.json, "
                                          r"b\.jsonl\); pass the file itself as --data"):
        task.resolved_reader_args(folder)
    (folder / "questions.json").write_text("[]")
    assert task.resolved_reader_args(folder)["path"] == str(folder / "questions.json")

    # records without a category, in a file of any name beside the images
    records = [{k: v for k, v in r.items() if k != "category"} for r in test_records[:12]]
    file = data / "my_questions.json"
    file.write_text(json.dumps(records))
    try:
        assert main(["eval", "default", "--tasks", "llava", "--data", str(file), "--limit", "12", "--no-blind",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        file.unlink()  # the module's data folder is shared with other tests
    result = load_runs(tmp_path / "out")[0].results[0]
    kinds = {answer_type(r["answer"]) for r in records}
    assert set(result.counts) == kinds | {OVERALL} and len(kinds) > 1
    assert sum(n for group, n in result.counts.items() if group != OVERALL) == result.counts[OVERALL] == 12
