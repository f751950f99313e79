"""Hallucination-aware decoding on the synthetic POPE-style suite: plain decoding against VCD, visual debias
decoding, post-hoc debias calibration and DAMRO, with the same sampler and the same seeds.

    python benchmarks/decoding_pope.py            # prints the Markdown table (~5-15 minutes on 2 busy CPU cores)
    python benchmarks/decoding_pope.py --write    # also puts it into BENCHMARKS.md (its own section, at the end)

Data: `monovlm.data.synthetic.synthesize(n, seed)` into a temporary folder; the questions are the test split's
existence questions ("Is there a <colour> <shape> in the image?", yes/no balanced per image, each image tagged with
a POPE split: random / popular / adversarial negatives). Seed 0 test images are never in the shipped model's
training data (the split depends on the image index only).

Model: the shipped tiny model (`monovlm.paths.DEFAULT_MODEL_DIR`) unless --model is given.

Decoding: greedy, and temperature-1 sampling over --seeds (VCD's own setting), each strategy with exactly the same
sampler settings and seeds as plain decoding: batch i of run seed s samples with seed (s, i), and VCD's noise seed
is s. Answers go
through POPE's official parser ("no" if a word of the first sentence is no/No/not, else yes); F1 takes yes as the
positive class; yes-ratio is the share of predictions that are yes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sections import replace_section  # benchmarks/sections.py (the script's own folder)

from monovlm.data.images import ImageLoadError
from monovlm.data.processor import Processor
from monovlm.data.synthetic import synthesize
from monovlm.infer.decoding import (
    DAMRO,
    VCD,
    BlankImage,
    ContrastiveDecoding,
    DebiasCalibration,
    NoImage,
    UnkImage,
    label_token_ids,
)
from monovlm.infer.generate import GenerationConfig, generate
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.tokenizer import Tokenizer

SECTION_TITLE = "## Hallucination-aware decoding (synthetic POPE)"
NOTES_MARKER = "<!-- notes below this line are kept when decoding_pope.py --write rewrites the section -->"
SPLITS = ("random", "popular", "adversarial")


# ---------------------------------------------------------------------------------------------------------------------
# POPE metrics: monovlm.eval.metrics when it is there, else the same definition here


def _local_pope(predictions: list[str], labels: list[str]) -> dict[str, float]:
    def parse(text: str) -> str:  # RUCAIBox/POPE evaluate.py
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(word in ("No", "no", "not") for word in words) else "yes"

    pairs = [(parse(p), label) for p, label in zip(predictions, labels)]
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / sum(t == "yes" for _, t in pairs) if any(t == "yes" for _, t in pairs) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "f1": f1, "yes_ratio": (tp + fp) / len(pairs)}


def pope(predictions: list[str], labels: list[str]) -> dict[str, float]:
    try:
        from monovlm.eval.metrics import pope_scores
    except ImportError:
        return _local_pope(predictions, labels)
    scores = pope_scores(predictions, labels)
    return {"accuracy": scores.accuracy, "f1": scores.f1, "yes_ratio": scores.yes_ratio}


# ---------------------------------------------------------------------------------------------------------------------
# questions and runs


@dataclass
class Question:
    ids: list[int]
    image: torch.Tensor  # (3, H, W), normalised
    label: str  # "yes" / "no"
    split: str


def load_questions(data_root: Path, processor: Processor, limit: int | None) -> tuple[list[Question], int]:
    """The test split's existence questions as prompts; unreadable images are skipped and counted."""
    records = json.loads((data_root / "instruct_test.json").read_text())
    records = [r for r in records if r["category"] == "existence"][:limit]
    questions, skipped = [], 0
    for record in records:
        try:
            image = processor.load(data_root / record["image"])
        except ImageLoadError as error:  # skip, count, report
            print(f"skipping {record['id']}: {error}", file=sys.stderr)
            skipped += 1
            continue
        ids, tensors = processor.prompt(record["question"], [image])
        questions.append(Question(ids, tensors[0], record["answer"], record["pope_split"]))
    return questions, skipped


def strategies(labels: dict[str, list[int]]) -> dict[str, tuple[str, object]]:
    """name -> (forward passes it costs, factory(seed) -> strategy or None)."""
    return {
        "plain": ("1 per step", lambda seed: None),
        "plain, blank image (blind reference)": ("1 per step", lambda seed: None),
        "VCD (α=1, β=0.1, noise step 500)": ("2 per step", lambda seed: VCD(1.0, 0.1, 500, seed)),
        "visual debias decoding (no image; α=1, β=0.2)": (
            "2 per step", lambda seed: ContrastiveDecoding(NoImage(), 1.0, 0.2)),
        "debias calibration (prior: no image)": (
            "1 per step + 1 prefill", lambda seed: DebiasCalibration(labels, (NoImage(),))),
        "debias calibration (prior: no image + unk)": (
            "1 per step + 2 prefills", lambda seed: DebiasCalibration(labels, (NoImage(), UnkImage(0)))),
        "debias calibration (prior: blank image)": (
            "1 per step + 1 prefill", lambda seed: DebiasCalibration(labels, (BlankImage(),))),
        "DAMRO (α=0.5, β=0.1, k=4, middle layer)": ("2 per step", lambda seed: DAMRO(0.5, 0.1, 4)),
    }


def predict(model, processor: Processor, questions: list[Question], config: GenerationConfig, make_strategy,
            seed: int, batch_size: int, blank: bool) -> list[str]:
    answers = []
    pad_id = processor.tokenizer.pad_id or 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = [torch.zeros_like(q.image) if blank else q.image for q in chunk]
        # one sampler seed per (run seed, batch): draws are independent across batches (one seed for every batch
        # would give each batch the same random numbers) and identical across strategies
        batch_config = config if config.seed is None else replace(config, seed=config.seed * 1_000_003 + start)
        results = generate(model, [q.ids for q in chunk], batch_config, processor.tokenizer, pad_id=pad_id,
                           prefill_inputs={"images": images}, strategy=make_strategy(seed))
        answers += [r.text.strip() for r in results]
    return answers


def evaluate(predictions: list[str], questions: list[Question]) -> dict[str, dict[str, float]]:
    scores = {"all": pope(predictions, [q.label for q in questions])}
    for split in SPLITS:
        index = [i for i, q in enumerate(questions) if q.split == split]
        if index:
            scores[split] = pope([predictions[i] for i in index], [questions[i].label for i in index])
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# report


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return _pct(values[0])
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown_tables(results: dict[str, dict], costs: dict[str, str], seeds: list[int]) -> str:
    lines = [
        f"Greedy, and sampled at T=1 (mean ± sd over seeds {', '.join(map(str, seeds))}); all figures in %:",
        "",
        ("| strategy | forwards | acc (greedy) | F1 (greedy) | yes-ratio (greedy) | acc (T=1) | F1 (T=1) "
         "| yes-ratio (T=1) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        greedy = result["greedy"]["all"]
        sampled = [run["all"] for run in result["sampled"]]
        cells = [_mean_sd([s[key] for s in sampled]) for key in ("accuracy", "f1", "yes_ratio")]
        lines.append(f"| {name} | {costs[name]} | {_pct(greedy['accuracy'])} | {_pct(greedy['f1'])} | "
                     f"{_pct(greedy['yes_ratio'])} | " + " | ".join(cells) + " |")
    lines += ["", "Greedy, per POPE split (accuracy / F1 / yes-ratio, %):", "",
              "| strategy | " + " | ".join(SPLITS) + " | mean F1 |", "|---|" + "---:|" * (len(SPLITS) + 1)]
    for name, result in results.items():
        greedy = result["greedy"]
        cells = [f"{_pct(greedy[s]['accuracy'])} / {_pct(greedy[s]['f1'])} / {_pct(greedy[s]['yes_ratio'])}"
                 for s in SPLITS]
        mean_f1 = statistics.mean(greedy[s]["f1"] for s in SPLITS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(mean_f1)} |")
    return "\n".join(lines)


def markdown_section(args, report: dict) -> str:
    counts = report["counts"]
    split_counts = ", ".join(f"{s} {counts[s]}" for s in SPLITS)
    skipped = f", {report['skipped']} skipped (unreadable images)" if report["skipped"] else ""
    description = (
        f"Model: `{report['model']}` (the shipped tiny EVE model). Questions: the existence questions of the test split "
        f"of `synthesize(n={args.n}, seed={args.data_seed})` — {counts['all']} questions ({split_counts}; half of "
        f"them answered yes){skipped}. "
        f"Every strategy runs with the same sampler settings: greedy, and temperature 1 with seeds "
        f"{', '.join(map(str, args.seeds))} (VCD's noise seed, and with the batch index the sampler's seed), "
        f"{args.max_new_tokens} new tokens at most, stop at `<|im_end|>`. Answers go through POPE's parser; F1 takes yes as positive; yes = share of "
        f"predictions that are yes. Debias calibration restricts the first token to the label tokens "
        f"{report['labels']} and picks argmax (greedy) or samples q(y) (T=1)."
    )
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `python benchmarks/decoding_pope.py --write{report['extra_args']}`  ",
        f"Date: {report['date']}; {report['minutes']:.1f} minutes on the 2-core CPU machine.",
        "",
        description,
        "",
        report["tables"],
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--n", type=int, default=4000, help="synthetic images to generate (test split ~20%%)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="sampling seeds, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every score to this JSON file")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    model = EncoderFreeVLM.load(args.model).eval()
    tokenizer = Tokenizer.from_folder(args.model)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    labels = label_token_ids(tokenizer, ("yes", "no"))
    with tempfile.TemporaryDirectory() as folder:
        synthesize(folder, n=args.n, seed=args.data_seed, progress=False)
        questions, skipped = load_questions(Path(folder), processor, args.limit)
    if not questions:
        raise SystemExit("no existence questions in the test split; raise --n")
    print(f"{len(questions)} questions, {skipped} skipped", file=sys.stderr)

    results: dict[str, dict] = {}
    costs = {}
    for name, (cost, make_strategy) in strategies(labels).items():
        costs[name] = cost
        blank = name.startswith("plain, blank")
        greedy_config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_ids=processor.stop_ids)
        greedy = evaluate(predict(model, processor, questions, greedy_config, make_strategy, 0, args.batch_size,
                                  blank), questions)
        sampled = []
        for seed in args.seeds:
            config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_ids=processor.stop_ids,
                                      temperature=1.0, seed=seed)
            sampled.append(evaluate(predict(model, processor, questions, config, make_strategy, seed,
                                            args.batch_size, blank), questions))
        results[name] = {"greedy": greedy, "sampled": sampled}
        print(f"  {name}: greedy acc {_pct(greedy['all']['accuracy'])}, F1 {_pct(greedy['all']['f1'])}, "
              f"yes {_pct(greedy['all']['yes_ratio'])} [{time.perf_counter() - began:.0f} s]", file=sys.stderr)

    tables = markdown_tables(results, costs, args.seeds)
    print(tables)
    defaults = {"n": 4000, "data_seed": 0, "seeds": [0, 1, 2], "limit": None, "max_new_tokens": 4, "model": DEFAULT_MODEL_DIR}
    extra = "".join(f" --{key.replace('_', '-')} {','.join(map(str, value)) if isinstance(value, list) else value}"
                    for key, value in vars(args).items() if key in defaults and value != defaults[key])
    counts = {"all": len(questions), **{s: sum(q.split == s for q in questions) for s in SPLITS}}
    model_name = (str(args.model.resolve().relative_to(REPO_ROOT)) if args.model.resolve().is_relative_to(REPO_ROOT)
                  else str(args.model))
    report = {"date": datetime.date.today().isoformat(), "minutes": (time.perf_counter() - began) / 60,
              "counts": counts, "skipped": skipped, "model": model_name, "extra_args": extra,
              "labels": {k: [tokenizer.decode([i]) for i in v] for k, v in labels.items()}, "tables": tables}
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "counts": counts}, indent=1) + "\n")
    if args.write:
        replace_section(args.benchmarks_file, SECTION_TITLE, markdown_section(args, report), NOTES_MARKER)
        print(f"wrote the section to {args.benchmarks_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
