"""Benchmark metrics, pure Python (stdlib only), each following its official definition.

Covered, with the source each one reproduces:

- VQA accuracy: GT-Vision-Lab/VQA `vqaEval.py` (master, a013f00): answer normalisation and the leave-one-annotator-out
  score `mean_i min(1, #{j != i: a_j == pred} / 3)`.
- Exact match, multiple-choice letter extraction, choice by log-likelihood.
- POPE: RUCAIBox/POPE `evaluate.py` (yes/no parser; accuracy, precision, recall, F1, yes-ratio of the predictions).
- MME: acc, acc+ and score = acc + acc+ per subtask, perception / cognition totals (MME's tool, as in lmms-eval).
- BLEU-1..4 and CIDEr-D exactly as coco-caption's scorers (pycocoevalcap 1.2 `bleu_scorer.py`, `cider_scorer.py`),
  with a pure-Python stand-in for its Java PTB tokeniser (`ptb_tokenize`).
- Per-class accuracy and a confusion matrix with an "other" column, rendered as Markdown.

Accuracies are fractions in [0, 1]; the MME numbers are in MME's own points (a subtask scores at most 200). Bad input
(lengths that differ, an empty reference list, a label that is not yes/no) raises ValueError naming what and why.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


def _same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# =====================================================================================================================
# VQA accuracy (official VQA evaluation)

# Punctuation the official code handles; "'" and ":" are deliberately absent ("don't", "10:30" survive).
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Official pattern is "(?!<=\d)(\.)(?!\d)": the look-behind is malformed (it is a look-ahead for "<=digit", which
# never matches at a "."), so it removes every period not followed by a digit: "3.5" keeps its period, "a.m." -> "am".
_VQA_PERIOD = re.compile(r"\.(?!\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: re.UNICODE (== 32) lands in the *count* argument.
_VQA_PERIOD_COUNT = 32
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# The official contraction table, verbatim (data), including its oddities: "somebody'd" -> "somebodyd", and keys with
# capitals ("Im", "Ive", "Id've") that can never match because words are lower-cased first.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def strip_vqa_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    Each listed mark is deleted when it touches a space in the *original* text (or when the original contains a
    digit-comma-digit such as "1,000"), and otherwise replaced by a space; then periods not followed by a digit go
    (at most 32 of them, as upstream). "Yes, it is." -> "Yes it is", "black-and-white" -> "black and white".
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        touches_space = (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def normalize_vqa_words(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words 0-10 -> digits, drop a/an/the, contractions."""
    words = [_VQA_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """Both official normalisation steps: punctuation, then digits / articles / contractions."""
    return normalize_vqa_words(strip_vqa_punctuation(text))


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_type(answer: str) -> str:
    """VQAv2's answer types for an answer: "yes/no", "number" (digits or a number word, after VQA normalisation:
    "Two." -> "2") or "other"."""
    normalized = normalize_vqa_answer(answer)
    if normalized in ("yes", "no"):
        return "yes/no"
    return "number" if _NUMBER.fullmatch(normalized) else "other"


def vqa_score(prediction: str, annotator_answers: Sequence[str], official_quirk: bool = True) -> float:
    """VQA accuracy of one prediction: mean over annotators i of min(1, #{other annotators j with a_j == pred} / 3).

    With 10 answers, k of them equal to the prediction score 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >=4; fewer
    answers work the same way (leave one out of however many there are).

    official_quirk=True (default, the official code): answers and prediction are normalised only when the annotators
    disagree (`len(set(answers)) > 1`); when all answers are identical the strings are compared as they are (after
    trimming whitespace), so "yes." scores 0 against ten "yes". False normalises always (lmms-eval since its PR #794).
    The default keeps numbers comparable with the official server; switch it off for chatty small models.
    """
    answers = [_vqa_clean(a) for a in annotator_answers]
    if not answers:
        raise ValueError("vqa_score needs at least one annotator answer, got none")
    pred = _vqa_clean(prediction)
    if len(set(answers)) > 1 or not official_quirk:
        answers = [normalize_vqa_answer(a) for a in answers]
        pred = normalize_vqa_answer(pred)
    matches = sum(a == pred for a in answers)
    # Leaving annotator i out removes one match exactly when a_i itself matches.
    per_annotator = [min(1.0, (matches - (a == pred)) / 3) for a in answers]
    return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(predictions: Sequence[str], annotator_answers: Sequence[Sequence[str]],
                 official_quirk: bool = True) -> float:
    """Corpus VQA accuracy: the mean of `vqa_score` over questions (official reports round(100 * this, 2))."""
    _same_length("predictions", predictions, "annotator_answers", annotator_answers)
    return _mean([vqa_score(p, a, official_quirk) for p, a in zip(predictions, annotator_answers)])


def grouped_mean(scores: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean score per group (e.g. VQA answer_type, POPE split) plus "overall" over all items."""
    _same_length("scores", scores, "groups", groups)
    by_group: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups):
        by_group[group].append(score)
    result = {group: _mean(values) for group, values in sorted(by_group.items())}
    result["overall"] = _mean(list(scores))
    return result


# =====================================================================================================================
# Exact match

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation -> space, collapse whitespace: "Top-left." == "top left"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_text(prediction) == normalize_text(target)


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    _same_length("predictions", predictions, "targets", targets)
    return _mean([float(exact_match(p, t)) for p, t in zip(predictions, targets)])


# =====================================================================================================================
# Multiple choice

def _letters(options: Sequence[str] | None, letters: str | None) -> str:
    if letters is not None:
        return letters
    if options is not None:
        if len(options) > 26:
            raise ValueError(f"at most 26 options can be lettered A-Z, got {len(options)}")
        return string.ascii_uppercase[: len(options)]
    return "ABCD"


def _option_from_text(text: str, options: Sequence[str], letters: str) -> str | None:
    """The letter of the one option whose text the answer gives (whole words; longest wins over its substrings)."""
    said = f" {normalize_text(text)} "
    names = [normalize_text(o) for o in options]
    hits = [i for i, name in enumerate(names) if name and f" {name} " in said]
    # "dark red" also contains "red": keep only hits not contained in another hit.
    hits = [i for i in hits if not any(j != i and f" {names[i]} " in f" {names[j]} " for j in hits)]
    return letters[hits[0]] if len(hits) == 1 else None


def extract_choice(text: str, options: Sequence[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none or several.

    Tried in order:
    1. the whole answer is a letter: "B", "b", "(B)", "B.", "B)", "[B]:";
    2. "answer is B" / "answer: (b)" anywhere (a lower-case letter only when bracketed or last: "answer is a dog"
       is not A);
    3. a leading letter with a mark: "B. a red circle", "(B) red";
    4. option text instead of a letter (`options` given): the one option whose words appear in the answer;
    5. exactly one distinct capital letter standing alone ("I pick C"); a capital "A" followed by a lower-case word
       is taken for an article ("A red circle") and does not count, unless that word is is/was/or/and/because/
       seems/looks ("A is correct", "A or B").
    Valid letters are `letters`, else the first len(options) capitals, else A-D.
    """
    valid = _letters(options, letters)
    stripped = text.strip()
    answer_is = r"(?i:answer)\s*(?:is|:)?\s*:?\s*[(\[]?"
    patterns = [r"^[(\[]?([A-Za-z])[)\]]?[.:)]?$",
                answer_is + r"([A-Z])\b",  # "answer is B because ..."
                answer_is + r"([a-z])(?:[)\]]|[.:,]?\s*$)",  # "answer is (c)" / "answer is b." but not "is a dog"
                r"^[(\[]?([A-Z])[.:)\]]\s"]
    for pattern in patterns:
        found = re.search(pattern, stripped)
        if found and found.group(1).upper() in valid:
            return found.group(1).upper()
    if options is not None:
        picked = _option_from_text(stripped, options, valid)
        if picked is not None:
            return picked
    no_article = re.sub(r"\bA(?=\s+[a-z])(?!\s+(?:is|was|or|and|because|seems|looks)\b)", " ", stripped)
    lone = {token for token in re.split(r"[\s.,;:!?()\[\]{}\"'*#]+", no_article) if len(token) == 1 and token in valid}
    return lone.pop() if len(lone) == 1 else None


def choice_by_loglik(logprobs: Sequence[float], lengths: Sequence[int] | None = None,
                     length_normalize: bool = False) -> int:
    """Index of the option the model finds most likely: argmax of the SUMMED log-probabilities of each option's
    continuation tokens (ties go to the lowest index).

    Summed is the default because it is the actual probability of the option string (lm-eval's `acc`), and it is
    the right thing for the common case of one-token letter answers, where normalising changes nothing. With
    length_normalize=True each sum is divided by its `lengths` entry (tokens, or bytes as lm-eval's `acc_norm`),
    which stops long options from losing just for being long.
    """
    if not logprobs:
        raise ValueError("choice_by_loglik needs at least one option, got none")
    scores = list(logprobs)
    if length_normalize:
        if lengths is None:
            raise ValueError("length_normalize=True needs the option lengths")
        _same_length("logprobs", logprobs, "lengths", lengths)
        if any(n <= 0 for n in lengths):
            raise ValueError(f"option lengths must be positive to normalise by them, got {list(lengths)}")
        scores = [s / n for s, n in zip(logprobs, lengths)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# =====================================================================================================================
# POPE

def pope_parse(text: str) -> str:
    """POPE's official parser: keep the text before the first ".", drop commas, split on spaces; "no" if any word is
    exactly "No", "no" or "not", else "yes" (so "NO", "Nope" and "" count as yes, as upstream)."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def _yes_no_label(label: str, index: int) -> str:
    value = label.strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"label {index} must be 'yes' or 'no', got {label!r}")
    return value


@dataclass(frozen=True)
class PopeScores:
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float  # 0 when nothing is predicted yes (upstream divides by zero)
    recall: float
    f1: float
    yes_ratio: float  # share of PREDICTIONS that are yes (lmms-eval reports the labels' share, always 0.5)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> PopeScores:
    """Accuracy, precision, recall, F1 (positive class "yes") and yes-ratio of free-text POPE answers.

    Predictions go through `pope_parse`; labels must be yes/no. Group by split (random / popular / adversarial)
    before calling; papers quote each split and the mean F1 over the three.
    """
    _same_length("predictions", predictions, "labels", labels)
    if not predictions:
        raise ValueError("pope_scores needs at least one prediction, got none")
    counts: Counter[tuple[str, str]] = Counter()
    for index, (prediction, label) in enumerate(zip(predictions, labels)):
        counts[(pope_parse(prediction), _yes_no_label(label, index))] += 1
    tp, fp = counts[("yes", "yes")], counts[("yes", "no")]
    tn, fn = counts[("no", "no")], counts[("no", "yes")]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = tp + fp + tn + fn
    return PopeScores(tp, fp, tn, fn, (tp + tn) / total, precision, recall, f1, (tp + fp) / total)


# =====================================================================================================================
# MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's answer parser as lmms-eval runs it (from Otter, a superset of MME's own): lower-case, strip, drop ".";
    "yes"/"no" as is; a lone "y"/"n"; else "yes" or "no" found within the first 4 characters; else "other"."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer, "other")
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@dataclass(frozen=True)
class MMESubtask:
    acc: float  # % of questions right
    acc_plus: float  # % of images with all (MME: both) of their questions right
    questions: int
    images: int
    unpaired_images: int  # images without exactly 2 questions (MME pairs a yes and a no question per image)

    @property
    def score(self) -> float:
        return self.acc + self.acc_plus


@dataclass(frozen=True)
class MMEResult:
    subtasks: dict[str, MMESubtask]
    perception: float  # sum of the perception subtask scores present (max 2000 with all 10)
    cognition: float  # sum of the cognition subtask scores present (max 800 with all 4)
    missing: list[str] = field(default_factory=list)  # official subtasks absent from the input


def mme_scores(subtasks: Sequence[str], image_ids: Sequence[str], predictions: Sequence[str],
               answers: Sequence[str]) -> MMEResult:
    """MME per subtask: acc (per question) and acc+ (per image), score = acc + acc+ (each in %, so at most 200);
    perception = sum over its 10 subtasks, cognition = sum over its 4 (names matched case-insensitively; subtasks
    outside both lists are scored but left out of the totals). Predictions go through `mme_parse`."""
    for name, values in (("image_ids", image_ids), ("predictions", predictions), ("answers", answers)):
        _same_length("subtasks", subtasks, name, values)
    right_by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for index, (subtask, image, prediction, answer) in enumerate(zip(subtasks, image_ids, predictions, answers)):
        gold = _yes_no_label(answer.replace(".", ""), index)
        right_by_image[subtask][image].append(mme_parse(prediction) == gold)
    results = {}
    for subtask, images in sorted(right_by_image.items()):
        flat = [right for rights in images.values() for right in rights]
        results[subtask] = MMESubtask(
            acc=100.0 * sum(flat) / len(flat),
            acc_plus=100.0 * sum(all(rights) for rights in images.values()) / len(images),
            questions=len(flat), images=len(images),
            unpaired_images=sum(len(rights) != 2 for rights in images.values()))
    lower = {name.lower(): name for name in results}

    def total(names: Sequence[str]) -> float:
        return sum(results[lower[n.lower()]].score for n in names if n.lower() in lower)

    missing = [n for n in MME_PERCEPTION + MME_COGNITION if n.lower() not in lower]
    return MMEResult(results, total(MME_PERCEPTION), total(MME_COGNITION), missing)


# =====================================================================================================================
# Caption tokenisation (coco-caption's PTB step, in pure Python)

# Tokens coco-caption drops after tokenising (`PUNCTUATIONS` in pycocoevalcap/tokenizer/ptbtokenizer.py), plus '"',
# which the Java tokeniser turns into `` or '' before the drop. Brackets are NOT dropped: with -lowerCase the Java
# tokeniser writes "-lrb-" while the drop list holds "-LRB-", so coco-caption keeps them; we do the same.
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
# Unicode punctuation the Java lexer writes as its ASCII PTB token (then dropped above): curly and angle quotes as
# `` '' ` ', dashes as --, the ellipsis as ... . U+2010 and U+2012 standing alone are "untokenizable" to it and
# deleted (a U+2010 inside a word joins it, as "-" does). „ ‚ ‟ ′ ″ are not normalised by it: they stay tokens.
_PTB_UNICODE = {"\u201c": "``", "\u201d": "''", "\u00ab": "``", "\u00bb": "''", "\u2018": "`", "\u2019": "'",
                "\u201b": "`", "\u2039": "`", "\u203a": "'", "\u2013": "--", "\u2014": "--", "\u2015": "--",
                "\u2026": "...", "\u2010": "", "\u2012": ""}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_SPLITS = [  # applied to lower-cased text, in order; a clitic's curly apostrophe comes out as the ASCII one
    (re.compile(r"\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"\b(gon|got|wan)(na|ta)\b"), r"\1 \2"),
    (re.compile(r"(?<=\w)n['\u2019]t\b"), " n't"),
    (re.compile(r"(?<=\w)['\u2019](s|re|ve|ll|d|m)\b"), r" '\1"),
]
_PTB_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|\b(?:mrs?|ms|dr|st|jr|sr|vs)\."  # a few abbreviations keep their period
    r"|(?:(?<!\S)-(?=\d))?\w+(?:(?:[-\u2010'\u2019./]|(?<=\d)[,:](?=\d))\w+)*(?:(?<=\.[^\W\d_])\.)?"  # 3.5 a.m.
    r"|\.{2,}|-{2,}|[?!]+"  # runs: ... -- ?!
    r"|\S"  # any other single character
)


def ptb_tokenize(text: str) -> str:
    """Tokens of a caption as coco-caption's Java PTB tokeniser (-lowerCase) plus its punctuation drop gives them,
    joined by spaces: lower-case, split clitics ("don't" -> "do n't", "man's" -> "man 's"), split punctuation off
    words but keep it inside them ("black-and-white", "3.5", "1,000", "10:30", "a.m."), drop punctuation tokens.

    A simplification of a large lexer, checked against the Java tokeniser on the cases in tests/test_metrics.py.
    Known differences: only a few abbreviations keep their period ("mr.", "st."; Java has a long list), "3:00pm"
    stays one token, "at&t" is split like "a&b", "rock'n'roll" stays one token, and Java's quirk of not
    lower-casing the very first token of its whole input is not copied.
    """
    lowered = text.replace("\n", " ").lower()
    for pattern, replacement in _PTB_SPLITS:
        lowered = pattern.sub(replacement, lowered)
    tokens = []
    for token in _PTB_TOKEN.findall(lowered):
        token = "..." if token.startswith("..") else "--" if token.startswith("--") else token
        token = _PTB_BRACKETS.get(token, _PTB_UNICODE.get(token, token))
        if token and token not in _PTB_DROP:
            tokens.append(token)
    return " ".join(tokens)


def _tokenized(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
               tokenize: bool) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Split captions into words (after `ptb_tokenize` when asked), checking the corpus shape."""
    _same_length("hypotheses", hypotheses, "references", references)
    if not hypotheses:
        raise ValueError("caption metrics need at least one image, got none")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{index}] must be a non-empty list of captions, got {refs!r}")
    prepare = ptb_tokenize if tokenize else (lambda s: s)
    hyps = [prepare(h).split() for h in hypotheses]
    refs = [[prepare(r).split() for r in image_refs] for image_refs in references]
    return hyps, refs


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of a word list."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# =====================================================================================================================
# BLEU (coco-caption)

_BLEU_TINY = 1e-15  # coco-caption's smoothing: correct + tiny over guessed + small, so no log(0) and no x/0
_BLEU_SMALL = 1e-9


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
         tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..n as coco-caption's `Bleu(4)` reports them (one hypothesis per image, any number of references).

    Clipped n-gram matches (each n-gram counted at most its max count in any one reference) and guesses are summed
    over the corpus; per image the reference length is the one closest to the hypothesis (ties: the shorter),
    summed too. BLEU-k = (prod_{m<=k} (correct_m + 1e-15) / (guessed_m + 1e-9))^(1/k), times the brevity penalty
    exp(1 - ref_len / hyp_len) when the corpus hypothesis length is shorter. The smoothing means a corpus without a
    single 4-gram match gets a tiny positive BLEU-4, not 0, as upstream.
    """
    hyps, refs = _tokenized(hypotheses, references, tokenize)
    correct, guessed = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for words, image_refs in zip(hyps, refs):
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in image_refs)[1]
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for r in image_refs:
            max_ref_counts |= _ngrams(r, n)  # | keeps the max count per n-gram
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(1, n + 1):
            guessed[k - 1] += max(0, len(words) - k + 1)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _BLEU_TINY) / (guessed[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# =====================================================================================================================
# CIDEr-D (coco-caption's "Cider")

class CorpusScore(NamedTuple):
    score: float  # the corpus score: mean over images
    per_image: list[float]


def _tfidf(counts: Counter[tuple[str, ...]], doc_freq: Mapping[tuple[str, ...], int], log_images: float,
           n: int) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """TF-IDF vector per n-gram order, its L2 norms, and the length CIDEr-D penalises.

    weight = count * (log(#images) - log(max(1, df))); an n-gram no reference uses gets df 1, i.e. full weight.
    The length is the number of BIGRAMS (coco-caption counts term frequencies of order index 1), i.e. words - 1.
    """
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, doc_freq.get(gram, 0))))
    norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
    length = sum(count for gram, count in counts.items() if len(gram) == 2)
    return vectors, norms, length


def _cider_similarity(hyp: tuple, ref: tuple, n: int, sigma: float) -> list[float]:
    """Per order: clipped cosine sum_g min(h_g, r_g) * r_g / (|h| |r|), times exp(-(len_h - len_r)^2 / (2 sigma^2))."""
    (hyp_vectors, hyp_norms, hyp_length), (ref_vectors, ref_norms, ref_length) = hyp, ref
    penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma**2))
    sims = []
    for k in range(n):
        dot = sum(min(w, ref_vectors[k].get(g, 0.0)) * ref_vectors[k].get(g, 0.0) for g, w in hyp_vectors[k].items())
        if hyp_norms[k] != 0 and ref_norms[k] != 0:
            dot /= hyp_norms[k] * ref_norms[k]
        sims.append(dot * penalty)
    return sims


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> CorpusScore:
    """CIDEr-D as coco-caption computes it (its `Cider` scorer is the -D variant).

    Document frequencies come from the CORPUS being scored: df(g) = number of images whose references contain g,
    idf = log(#images) - log(max(1, df)). Per image: for n = 1..4 the clipped TF-IDF cosine with each reference,
    times the Gaussian length penalty (sigma 6), averaged over n, summed over references and divided by their number,
    times 10. The corpus score is the mean over images.

    Because idf is measured on the corpus itself, one image gives log(1) - log(1) = 0 for every n-gram, so the
    score is 0 whatever the captions, and a handful of images gives unstable numbers: use ~50 images or more.
    """
    hyps, refs = _tokenized(hypotheses, references, tokenize)
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for image_refs in refs:
        doc_freq.update(set().union(*(_ngrams(r, n) for r in image_refs)))
    log_images = math.log(len(refs))
    per_image = []
    for words, image_refs in zip(hyps, refs):
        hyp = _tfidf(_ngrams(words, n), doc_freq, log_images, n)
        total = [0.0] * n
        for r in image_refs:
            sims = _cider_similarity(hyp, _tfidf(_ngrams(r, n), doc_freq, log_images, n), n, sigma)
            total = [t + s for t, s in zip(total, sims)]
        per_image.append(10.0 * _mean(total) / len(image_refs))
    return CorpusScore(_mean(per_image), per_image)


# =====================================================================================================================
# Per-class accuracy and confusion matrix

def per_class_accuracy(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Share of each label's items predicted as that label (per-class recall), labels in sorted order."""
    _same_length("labels", labels, "predictions", predictions)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter(labels)
    for label, prediction in zip(labels, predictions):
        right[label] += label == prediction
    return {label: right[label] / total[label] for label in sorted(total)}


@dataclass(frozen=True)
class ConfusionMatrix:
    classes: list[str]  # row labels; the columns are classes + [other]
    counts: list[list[int]]  # counts[i][j]: items labelled classes[i] predicted columns[j]
    other: str = "other"

    @property
    def columns(self) -> list[str]:
        return self.classes + [self.other]


def confusion_matrix(labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str] | None = None,
                     other: str = "other") -> ConfusionMatrix:
    """Counts of (label, prediction); rows are `classes` (default: the sorted labels), and any prediction that is
    not a class lands in the last column, `other`. Labels outside `classes` are an error."""
    _same_length("labels", labels, "predictions", predictions)
    rows = list(classes) if classes is not None else sorted(set(labels))
    if other in rows:
        raise ValueError(f"the 'other' column name {other!r} is also a class; pass a different `other`")
    index = {name: i for i, name in enumerate(rows)}
    counts = [[0] * (len(rows) + 1) for _ in rows]
    for label, prediction in zip(labels, predictions):
        if label not in index:
            raise ValueError(f"label {label!r} is not one of the classes {rows}")
        counts[index[label]][index.get(prediction, len(rows))] += 1
    return ConfusionMatrix(rows, counts, other)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def confusion_markdown(matrix: ConfusionMatrix) -> str:
    """A Markdown table: one row per label, one column per prediction (last: other)."""
    lines = ["| label \\ prediction | " + " | ".join(_cell(c) for c in matrix.columns) + " |",
             "|---|" + "---:|" * len(matrix.columns)]
    for name, row in zip(matrix.classes, matrix.counts):
        lines.append(f"| {_cell(name)} | " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
