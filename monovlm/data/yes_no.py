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
  nothing and only the image can lower the loss;
- "open": the yes/no questions are left out, from single-question records and from inside conversations: a stage
  of the questions whose answers the wording cannot give (colours, kinds, counts), where only looking lowers the
  loss, to run before a stage that adds the yes/no questions back;
- "weighted": the conversations stay as the data has them (grouped by image when the stage groups), and each yes/no
  reply's loss is weighted so that within each wording "yes" and "no" carry equal total weight (`WordingBalance`):
  the balance of "balanced" without repeating samples or taking the questions out of their conversations, so the
  other questions keep their share of the stage.

A wording (`Wordings`) is the question itself where the data asks it often enough (VQA v2's complementary pairs: the
same question, two images, two answers), else its first three words (VQA's question types). The first three words
alone would leave a prior: "Does the image contain a ...?" (mostly "yes") and "Does the image contain no ...?" (mostly
"no") are one question type, as are "Is the ring blue?" and "Is the ring not blue?".
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from typing import Any, Iterable

from monovlm.data.processor import IMAGE_MARKER

YES_NO_MODES = ("grouped", "singles", "balanced", "weighted", "open")
MIN_EXACT_QUESTION = 10  # a question asked this often (about as many images) is balanced as a wording of its own
MAX_WEIGHT = 10.0  # a wording whose rarer answer is very rare: its few replies weigh at most this much
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
    return yes_no_word(answer["value"])


def wording(record: dict[str, Any], words: int = 3) -> str:
    """The question's first `words` words, lower-cased: its wording as VQA's question types group it ("is there no",
    "does the image")."""
    return question_wording(_question(record), words)


def _question(record: dict[str, Any]) -> str:
    return str(record["conversations"][0].get("value", ""))


def question_wording(question: str, words: int | None = 3) -> str:
    """The question's lower-cased words, its first `words` of them (None: all)."""
    return " ".join(_WORD.findall(question.replace(IMAGE_MARKER, "").lower())[:words])


class Wordings:
    """The wording each question is balanced within, learnt from the questions of a data set: the question itself
    (its lower-cased words) when it is asked at least `min_exact` times, else its first three words, so that a
    question too rare to balance alone still shares its question type's balance."""

    def __init__(self, questions: Iterable[str], min_exact: int = MIN_EXACT_QUESTION):
        self.asked = Counter(question_wording(question, None) for question in questions)
        self.min_exact = min_exact

    def __call__(self, question: str) -> str:
        whole = question_wording(question, None)
        return whole if self.asked[whole] >= self.min_exact else question_wording(question)

    @classmethod
    def of_singles(cls, records: list[dict[str, Any]]) -> "Wordings":
        """The wordings of the single yes/no questions among `records`."""
        return cls(_question(record) for record in records if yes_no_answer(record) is not None)


def yes_no_word(reply: str) -> str | None:
    """"yes" or "no" when the reply is that one word (any case, punctuation), else None."""
    words = _WORD.findall(reply.lower())
    return words[0] if len(words) == 1 and words[0] in ("yes", "no") else None


def question_replies(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(the question before it, the reply) for each assistant reply of a LLaVA record, in order; a reply with no
    question before it pairs with ""."""
    pairs, question = [], ""
    turns = record.get("conversations") if isinstance(record, dict) else None
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        if turn.get("from") in ("gpt", "assistant"):
            pairs.append((question, turn["value"]))
        elif turn.get("from") in ("human", "user"):
            question = turn["value"]
    return pairs


def wording_answers(asked: list[tuple[str, str]]) -> tuple[Wordings, dict[str, dict[str, int]]]:
    """The `Wordings` of (question, "yes" | "no") pairs, and each wording's count of either answer."""
    wordings = Wordings(question for question, _ in asked)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"yes": 0, "no": 0})
    for question, answer in asked:
        counts[wordings(question)][answer] += 1
    return wordings, counts


class WordingBalance:
    """Loss weights for yes/no replies that make each wording's "yes" and "no" weigh the same in total.

    Counted over `records` (every reply of every conversation): a wording w with n_yes and n_no replies gives each
    "yes" the weight (n_yes + n_no) / (2 n_yes) and each "no" (n_yes + n_no) / (2 n_no), at most MAX_WEIGHT; the
    replies' weights then average 1 within the wording, and a model that answers from the wording alone gains
    nothing in expectation. Other replies, and wordings with one answer only, weigh 1. A class, not a closure, so
    that data-loading workers started with spawn can receive it."""

    def __init__(self, records: list[dict[str, Any]]):
        asked = [(question, yes_no_word(reply)) for record in records for question, reply in question_replies(record)]
        self.wordings, counts = wording_answers([(question, answer) for question, answer in asked if answer])
        self.weights: dict[tuple[str, str], float] = {}
        for key, count in counts.items():
            total = count["yes"] + count["no"]
            if count["yes"] and count["no"]:
                for answer, n in count.items():
                    self.weights[(key, answer)] = min(MAX_WEIGHT, total / (2 * n))

    def reply_weights(self, record: dict[str, Any]) -> list[float]:
        """One weight per assistant reply of `record`, in order."""
        out = []
        for question, reply in question_replies(record):
            answer = yes_no_word(reply)
            out.append(1.0 if answer is None else self.weights.get((self.wordings(question), answer), 1.0))
        return out

    def label_weights(self, labels: list[int], record: dict[str, Any], ignore_index: int) -> list[float] | None:
        """Per-token weights for a processed sample of `record`: every token of the k-th labelled run (the k-th
        assistant reply and its end token) gets the k-th reply's weight. None (all 1) when the runs are not one per
        reply (a template that labels only the last reply, as "plain" does) or no reply is weighted."""
        weights = self.reply_weights(record)
        if all(weight == 1.0 for weight in weights):
            return None
        out, run, inside = [], -1, False
        for label in labels:
            labelled = label != ignore_index
            if labelled and not inside:
                run += 1
            inside = labelled
            out.append(weights[run] if labelled and run < len(weights) else 1.0)
        return out if run + 1 == len(weights) else None


def without_yes_no(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if yes_no_answer(record) is None]


def without_yes_no_turns(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` with every yes/no question-and-reply pair taken out of their conversations (the image marker moves
    to the first question left); a record left with no pair is dropped. A record that is not (human, gpt) pairs of
    strings is kept as it is, for the processor to read or skip by its own rules."""
    out = []
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not _question_reply_pairs(turns):
            out.append(record)
            continue
        pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        kept = [(question, reply) for question, reply in pairs if yes_no_word(reply) is None]
        if len(kept) == len(pairs):
            out.append(record)
        elif kept:
            marker = any(IMAGE_MARKER in question for question, _ in pairs)
            conversation = []
            for k, (question, reply) in enumerate(kept):
                question = question.replace(IMAGE_MARKER, "").strip()
                if k == 0 and marker:
                    question = f"{IMAGE_MARKER}\n{question}"
                conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
            out.append({**record, "conversations": conversation})
    return out


def _question_reply_pairs(turns: Any) -> bool:
    return (isinstance(turns, list) and len(turns) > 0 and len(turns) % 2 == 0
            and all(isinstance(turn, dict) and turn.get("from") == ("human", "gpt")[i % 2]
                    and isinstance(turn.get("value"), str) for i, turn in enumerate(turns)))


def yes_no_singles(records: list[dict[str, Any]], balanced: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """The single yes/no questions of `records`; with `balanced`, each wording's rarer answer repeated (its records in
    turn, from a seeded shuffle) until it is as frequent as the commoner one. A wording with one answer only cannot be
    balanced and is kept as it is."""
    singles = [record for record in records if yes_no_answer(record) is not None]
    if not balanced:
        return singles
    wordings = Wordings.of_singles(singles)
    by_wording: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {"yes": [], "no": []})
    for record in singles:
        by_wording[wordings(_question(record))][yes_no_answer(record)].append(record)
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


def wording_prior(records: list[dict[str, Any]], wordings: Wordings | None = None) -> float:
    """The share of yes/no questions a blind rule answers right by giving each wording its commoner answer (fit and
    scored on `records`; the wordings learnt from them unless given): how much the wording alone says."""
    wordings = wordings or Wordings.of_singles(records)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"yes": 0, "no": 0})
    for record in records:
        answer = yes_no_answer(record)
        if answer is not None:
            counts[wordings(_question(record))][answer] += 1
    total = sum(sum(c.values()) for c in counts.values())
    return sum(max(c.values()) for c in counts.values()) / total if total else 0.0
