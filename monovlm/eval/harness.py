"""Run tasks on a model, always beside the blind baseline, and score them per category.

For each task: read the samples (bad records skipped and counted by the reader), load each image with the shared
safe loader (unreadable images skipped and counted here), ask the model in batches (progress bar), extract the
answer as the task says, and score it per category with the task's metric. The blind baseline repeats the run with
every image replaced by a uniform grey image of the same size: what it scores comes from the question text alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from monovlm.data.datasets import SkipReport, SkippedSample
from monovlm.data.images import ImageLoadError
from monovlm.eval import metrics
from monovlm.eval.protocol import LoglikelihoodRequest, ModelRunner, Query, chunks
from monovlm.eval.samples import EvalSample
from monovlm.eval.tasks import Task
from monovlm.infer.generate import GenerationConfig

# the headline number of each metric, shown in tables and plots
PRIMARY = {"exact_match": "accuracy", "vqa": "vqa_accuracy", "pope": "accuracy", "mme": "score",
           "captions": "cider", "multiple_choice": "accuracy"}
OVERALL = "overall"


def blank_like(image: Image.Image) -> Image.Image:
    """A uniform grey image of the same size: the blind baseline's input."""
    return Image.new("RGB", image.size, (128, 128, 128))


@dataclass
class TaskResult:
    task: str
    metric: str
    primary: str
    blind: bool
    scores: dict[str, dict[str, float]]  # group -> metric -> value; the group "overall" covers every sample
    counts: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    skip_summary: str = ""
    notes: list[str] = field(default_factory=list)  # what a reader of the numbers must know (e.g. partial totals)

    def headline(self) -> dict[str, float]:
        return {group: values[self.primary] for group, values in self.scores.items() if self.primary in values}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------------------------------------------
# answer extraction


def extract(kind: str, text: str, sample: EvalSample) -> str:
    if kind == "raw":
        return text.strip()
    if kind == "first_line":
        lines = text.strip().splitlines()
        return lines[0].strip() if lines else ""
    if kind == "yes_no":
        return metrics.pope_parse(text)
    if kind == "letter":
        return metrics.extract_choice(text, sample.choices) or ""
    raise ValueError(f"unknown answer extraction {kind!r}")


# -------------------------------------------------------------------------------------------------------------------
# scoring: each metric turns (samples, extracted predictions) of one group into named numbers


def _score_exact_match(samples: Sequence[EvalSample], predictions: Sequence[str]) -> tuple[dict[str, float], list[float]]:
    hits = [float(any(metrics.exact_match(p, a) for a in s.answers)) for s, p in zip(samples, predictions)]
    return {"accuracy": sum(hits) / len(hits)}, hits


def _score_vqa(samples, predictions):
    values = [metrics.vqa_score(p, s.answers) for s, p in zip(samples, predictions)]
    return {"vqa_accuracy": sum(values) / len(values)}, values


def _score_pope(samples, predictions):
    labels = [s.answers[0] for s in samples]
    values = metrics.pope_scores(predictions, labels)
    named = {k: getattr(values, k) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return named, [float(metrics.pope_parse(p) == label.strip().lower()) for p, label in zip(predictions, labels)]


def _score_mme(samples, predictions):
    """Per subtask: acc, acc+ (as fractions) and MME's score (acc% + acc+%, at most 200); summed over subtasks."""
    result = metrics.mme_scores([s.category for s in samples], [str(s.meta.get("image_key", s.image)) for s in samples],
                                list(predictions), [s.answers[0] for s in samples])
    subtasks = result.subtasks.values()
    values = {"score": sum(st.score for st in subtasks),
              "acc": sum(st.acc * st.questions for st in subtasks) / 100 / max(1, sum(st.questions for st in subtasks)),
              "acc_plus": sum(st.acc_plus * st.images for st in subtasks) / 100 / max(1, sum(st.images for st in subtasks))}
    if len(result.subtasks) > 1:
        values.update(perception=result.perception, cognition=result.cognition)
    hits = [float(metrics.mme_parse(p) == s.answers[0].replace(".", "").strip().lower())
            for s, p in zip(samples, predictions)]
    return values, hits


def _score_captions(samples, predictions):
    references = [list(s.answers) for s in samples]
    cider = metrics.cider_d(list(predictions), references)
    values = {"bleu4": metrics.bleu(list(predictions), references, n=4)[3], "cider": cider.score}
    return values, list(cider.per_image)


def gold_letter(sample: EvalSample) -> str:
    """The correct option's letter: the answer itself when it is a letter, else the option it names."""
    choices = sample.choices or []
    answer = sample.answers[0].strip()
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if answer.upper() in letters and len(answer) == 1:
        return answer.upper()
    for letter, choice in zip(letters, choices):
        if metrics.exact_match(choice, answer):
            return letter
    raise ValueError(f"sample {sample.id}: the answer {answer!r} is neither an option letter nor an option")


def _score_multiple_choice(samples, predictions):
    hits = [float(p == gold_letter(s)) for s, p in zip(samples, predictions)]
    return {"accuracy": sum(hits) / len(hits)}, hits


SCORERS = {"exact_match": _score_exact_match, "vqa": _score_vqa, "pope": _score_pope, "mme": _score_mme,
           "captions": _score_captions, "multiple_choice": _score_multiple_choice}


def group_of(sample: EvalSample, group_by: str) -> str:
    if group_by == "category":
        return sample.category
    return str(sample.meta.get(group_by, "all"))


def score(task: Task, samples: Sequence[EvalSample], predictions: Sequence[str]):
    """(scores per group incl. "overall", counts per group, per-sample values) for the task's metric."""
    scorer = SCORERS[task.metric]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[group_of(sample, task.group_by)].append(index)
    scores, counts = {}, {}
    for group in sorted(groups):
        members = groups[group]
        scores[group], _ = scorer([samples[i] for i in members], [predictions[i] for i in members])
        counts[group] = len(members)
    scores[OVERALL], per_sample = scorer(list(samples), list(predictions))
    counts[OVERALL] = len(samples)
    return scores, counts, per_sample


# -------------------------------------------------------------------------------------------------------------------
# running


def selected(task: Task, samples: Sequence[EvalSample]) -> list[EvalSample]:
    """The samples matching the task's `where` (on category or a meta field)."""
    def keep(sample: EvalSample) -> bool:
        for key, wanted in task.where.items():
            value = sample.category if key == "category" else sample.meta.get(key)
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if value not in allowed:
                return False
        return True

    return [s for s in samples if keep(s)]


def load_images(runner: ModelRunner, samples: Sequence[EvalSample], skipped: SkipReport, blank: bool):
    """(usable samples, their images) — an unreadable image skips its sample, counted with the reason."""
    usable, images = [], []
    for sample in samples:
        if not sample.answers:  # e.g. VQAv2 test-dev without annotations: nothing to score against
            skipped.record(SkippedSample(f"sample {sample.id}", "no reference answers", "the sample has no answers"))
            continue
        try:
            image = runner.load_image(sample.image) if sample.image is not None else None
        except ImageLoadError as error:
            skipped.record(SkippedSample(f"sample {sample.id}", "unreadable image", str(error)))
            continue
        skipped.record(sample)
        usable.append(sample)
        images.append(blank_like(image) if blank and image is not None else image)
    return usable, images


def _answer_generate(runner: ModelRunner, task: Task, samples, images, bar) -> list[str]:
    settings = GenerationConfig(max_new_tokens=task.max_new_tokens)
    outputs: list[str] = []
    for batch in chunks(list(zip(samples, images)), runner.batch_size):
        queries = [Query(task.prompt(s.question), [i] if i is not None else []) for s, i in batch]
        outputs += runner.generate(queries, settings)
        bar.update(len(batch))
    return outputs


def _answer_loglikelihood(runner: ModelRunner, task: Task, samples, images, bar) -> list[str]:
    """The option with the highest summed log-probability, as its letter (A, B, ...)."""
    outputs = []
    for sample, image in zip(samples, images):
        if not sample.choices:
            raise ValueError(f"task {task.name!r}: sample {sample.id} has no choices to score")
        requests = [LoglikelihoodRequest(task.prompt(sample.question), choice,
                                         [image] if image is not None else []) for choice in sample.choices]
        log_probs = [value for value, _ in runner.loglikelihood(requests)]
        outputs.append(chr(ord("A") + metrics.choice_by_loglik(log_probs)))
        bar.update(1)
    return outputs


def run_task(runner: ModelRunner, task: Task, samples: Sequence[EvalSample], blank: bool = False,
             skipped: SkipReport | None = None, progress: bool = False) -> TaskResult:
    """Ask the model every sample of the task (with blank images when `blank`) and score the answers."""
    skipped = skipped if skipped is not None else SkipReport()
    usable, images = load_images(runner, selected(task, samples), skipped, blank)
    if not usable:
        raise ValueError(f"task {task.name!r}: no usable samples ({skipped.summary()})")
    label = f"{task.name} ({'blind' if blank else runner.name})"
    with tqdm(total=len(usable), desc=label, disable=not progress, leave=False) as bar:
        answer = _answer_loglikelihood if task.output == "loglikelihood" else _answer_generate
        outputs = answer(runner, task, usable, images, bar)
    extracted = outputs if task.output == "loglikelihood" else [extract(task.extract, o, s) for o, s in zip(outputs, usable)]
    scores, counts, per_sample = score(task, usable, extracted)
    predictions = [
        {"id": s.id, "group": group_of(s, task.group_by), "question": s.question, "output": o, "prediction": e,
         "answers": s.answers[:10], "score": v}
        for s, o, e, v in zip(usable, outputs, extracted, per_sample)
    ]
    return TaskResult(task.name, task.metric, PRIMARY[task.metric], blank, scores, counts, predictions,
                      skipped.skipped, skipped.summary())
