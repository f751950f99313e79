"""What a model's existence answers rest on: the yes-minus-no logit, split by what the image holds of the asked object.

For the existence questions ("Is there a red circle in the image?") of a `monovlm data synth` folder, read the first
answer token's logits and take `margin = logit("yes") - logit("no")`. Group the questions by what the image holds of
the asked object — present (answer yes), or absent with its colour and its kind both on other shapes, only its colour,
only its kind, or neither — and report, per group, the mean margin and the AUC of the positives' margins against the
group's (the chance that a random present object gets a larger margin than a random absent one of that group; 0.5 =
no evidence). A model that checks colours separates "neither" and "kind only" from the positives; one that also
binds the kind to the colour separates "colour only" and "colour and kind apart" as well. The same with a blank image
says how much of it the question's wording alone gives.

    python benchmarks/existence_evidence.py --model default --data runs/quickstart/data [--split train] [--limit 600]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from monovlm.data import synthetic as syn

QUESTION = re.compile(r"^Is there an? (\w+) (\w+) in the image\?$")
POSITIVE = "present (yes)"
GROUPS = (POSITIVE, "colour and kind on other shapes", "colour only", "kind only", "neither")


def asked_object(question: str) -> tuple[str, str]:
    """(colour, kind) of an existence question; ValueError for any other question."""
    match = QUESTION.match(question)
    if not match or match.group(1) not in syn.COLORS or match.group(2) not in syn.KINDS:
        raise ValueError(f"not a synthetic existence question: {question!r}")
    return match.group(1), match.group(2)


def evidence_group(question: str, shapes: list[dict]) -> str:
    """Which of GROUPS a question about an image with these shapes (scenes.json entries) falls in."""
    colour, kind = asked_object(question)
    if any(s["color"] == colour and s["kind"] == kind for s in shapes):
        return POSITIVE
    has_colour, has_kind = any(s["color"] == colour for s in shapes), any(s["kind"] == kind for s in shapes)
    return GROUPS[1] if has_colour and has_kind else GROUPS[2] if has_colour else GROUPS[3] if has_kind else GROUPS[4]


def auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(a positive's score > a negative's), ties counting half (Mann-Whitney); NaN when a side is empty."""
    if not len(positives) or not len(negatives):
        return float("nan")
    above = (positives[:, None] > negatives[None, :]).float()
    ties = (positives[:, None] == negatives[None, :]).float()
    return float((above + 0.5 * ties).mean())


def margins(model, processor, tokenizer, records: list[dict], images: list) -> torch.Tensor:
    """(N,) logit("yes") - logit("no") of each record's first answer token, asked about the matching PIL image."""
    from monovlm.eval.protocol import ModelRunner, Query

    yes, no = tokenizer.encode("yes"), tokenizer.encode("no")
    if len(yes) != 1 or len(no) != 1:
        raise SystemExit(f"the tokenizer splits 'yes' or 'no' into several tokens ({yes}, {no}); this probe needs one")
    runner = ModelRunner(model, processor)
    logits = runner.next_token_logits([Query(r["question"], [image]) for r, image in zip(records, images)])  # (N, V)
    return logits[:, yes[0]] - logits[:, no[0]]


def table(groups: list[str], with_image: torch.Tensor, with_blank: torch.Tensor) -> str:
    """Markdown: per group, questions, mean margin and AUC against the positives, with the image and blank."""
    lines = ["| asked object | questions | mean margin | AUC vs present | blank: mean margin | blank: AUC |",
             "|---|---:|---:|---:|---:|---:|"]
    is_positive = torch.tensor([g == POSITIVE for g in groups])
    for group in GROUPS:
        chosen = torch.tensor([g == group for g in groups])
        if not chosen.any():
            continue
        cells = []
        for scores in (with_image, with_blank):
            versus = "" if group == POSITIVE else f"{auc(scores[is_positive], scores[chosen]):.3f}"
            cells += [f"{float(scores[chosen].mean()):+.2f}", versus]
        lines.append(f"| {group} | {int(chosen.sum())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' for the shipped model")
    parser.add_argument("--data", type=Path, required=True, help="a `monovlm data synth` folder")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--limit", type=int, default=600, help="most existence questions to read")
    args = parser.parse_args()

    from PIL import Image

    from monovlm.data.processor import Processor
    from monovlm.eval.harness import blank_like
    from monovlm.eval.run import resolve_model
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.tokenizer import Tokenizer

    folder = resolve_model(args.model)
    model, tokenizer = EncoderFreeVLM.load(folder).eval(), Tokenizer.from_folder(folder)
    processor = Processor(tokenizer, model.config.vision, model.config.processor)
    shapes = {s["image"]: s.get("shapes", []) for s in json.loads((args.data / "scenes.json").read_text())}
    records = [r for r in json.loads((args.data / syn.qa_file(args.split)).read_text())
               if r.get("category") == "existence" and QUESTION.match(r["question"])][: args.limit]
    if not records:
        raise SystemExit(f"{args.data / syn.qa_file(args.split)} has no existence questions")
    groups = [evidence_group(r["question"], shapes[r["image"]]) for r in records]
    images = [Image.open(args.data / r["image"]).convert("RGB") for r in records]  # read once, used twice
    with torch.no_grad():
        with_image = margins(model, processor, tokenizer, records, images)
        with_blank = margins(model, processor, tokenizer, records, [blank_like(image) for image in images])
    print(f"{len(records)} {args.split} existence questions; margin = logit('yes') - logit('no'); "
          f"says yes to {100 * float((with_image > 0).float().mean()):.1f}% (blank: "
          f"{100 * float((with_blank > 0).float().mean()):.1f}%)")
    print(table(groups, with_image, with_blank))


if __name__ == "__main__":
    main()
