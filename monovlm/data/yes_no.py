"""Yes/no questions as their own samples, balanced per wording: a way off the plateau where a model answers yes/no
questions from the question's wording and never looks at the image.

In many QA data sets the wording of a yes/no question predicts its answer ("Is there no ...?" is mostly "no"), and a
model learns that prior long before it learns to read the image for it. Two remedies a stage can choose
(`yes_no` in a recipe stage):

- "singles": the yes/no questions are taken out of the image-grouped conversations and read as samples of their own,
  so each is asked about a fresh image with no other turns of the conversation to lean on (the mixture the synthetic
  recipe uses: conversations without existence questions, existence questions alone);
- "balanced": as singles, re-sampled so that within each wording (the question's first words, as VQA's question
  types) "yes" and "no" are equally frequent — VQA v2's balanced pairs, made by repetition: the wording then predicts
  nothing and only the image can lower the loss.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any

from monovlm.data.processor import IMAGE_MARKER

YES_NO_MODES = ("grouped", "singles", "balanced")
_WORD = re.compile(r"[a-z0-9']+")


def yes_no_answer(record: dict[str, Any]) -> str | None:
    """"yes" or "no" when the record is one question about one image answered by yes or no, else None."""
    turns = record.get("conversations")
    if not isinstance(record.get("image"), str) or not isinstance(turns, list) or len(turns) != 2:
        return None
    question, answer = turns
    if not (isinstance(question, dict) and isinstance(answer, dict) and question.get("from") in ("human", "user")
            and isinstance(answer.get("value"), str)):
        return None
    words = _WORD.findall(answer["value"].lower())
    return words[0] if len(words) == 1 and words[0] in ("yes", "no") else None


def wording(record: dict[str, Any], words: int = 3) -> str:
    """The question's first `words` words, lower-cased: its wording as VQA's question types group it ("is there no",
    "does the image")."""
    text = record["conversations"][0].get("value", "")
    return " ".join(_WORD.findall(str(text).replace(IMAGE_MARKER, "").lower())[:words])


def without_yes_no(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if yes_no_answer(record) is None]


def yes_no_singles(records: list[dict[str, Any]], balanced: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """The single yes/no questions of `records`; with `balanced`, each wording's rarer answer repeated (its records in
    turn, from a seeded shuffle) until it is as frequent as the commoner one. A wording with one answer only cannot be
    balanced and is kept as it is."""
    singles = [record for record in records if yes_no_answer(record) is not None]
    if not balanced:
        return singles
    by_wording: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {"yes": [], "no": []})
    for record in singles:
        by_wording[wording(record)][yes_no_answer(record)].append(record)
    rng = random.Random(seed)
    out = []
    for key in sorted(by_wording):
        answers = by_wording[key]
        target = max(len(group) for group in answers.values())
        for group in answers.values():
            out += group
            if group and len(group) < target:
                extra = list(group)
                rng.shuffle(extra)
                out += [extra[i % len(extra)] for i in range(target - len(group))]
    return out


def wording_prior(records: list[dict[str, Any]]) -> float:
    """The share of yes/no questions a blind rule answers right by giving each wording its commoner answer (fit and
    scored on `records`): how much the wording alone says."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"yes": 0, "no": 0})
    for record in records:
        answer = yes_no_answer(record)
        if answer is not None:
            counts[wording(record)][answer] += 1
    total = sum(sum(c.values()) for c in counts.values())
    return sum(max(c.values()) for c in counts.values()) / total if total else 0.0
