"""Golden tests for monovlm.eval.metrics.

Every expected number is either worked by hand from the official definition (shown in the comments), recorded from
the reference implementation (the Java PTB tokeniser behind coco-caption), or computed live by the reference
implementation (pycocoevalcap's Bleu / Cider scorers).
"""

import math
import os
import random
import shutil
import subprocess

import pytest

from monovlm.eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    answer_type,
    bleu,
    choice_by_loglik,
    cider_d,
    confusion_markdown,
    confusion_matrix,
    exact_match,
    exact_match_accuracy,
    extract_choice,
    grouped_mean,
    mme_parse,
    mme_scores,
    normalize_vqa_answer,
    per_class_accuracy,
    pope_parse,
    pope_scores,
    ptb_tokenize,
    strip_vqa_punctuation,
    vqa_accuracy,
    vqa_score,
)

# ---------------------------------------------------------------------------------------------------------------------
# VQA: normalisation, worked through the official rules (processPunctuation, then processDigitArticle)


@pytest.mark.parametrize("raw, expected", [
    ("Yes, it is.", "yes it is"),  # ", " touches a space -> deleted; final "." not before a digit -> deleted
    ("black-and-white", "black and white"),  # "-" touches no space -> replaced by a space
    ("1,000", "1000"),  # digit-comma-digit in the text -> every listed mark is deleted, not spaced
    ("Two dogs!", "2 dogs"),  # "!" replaced by a space, "two" -> "2"
    ("The cat", "cat"),  # article dropped
    ("3.5", "3.5"),  # a period followed by a digit stays
    ("3.5.", "3.5"),  # ... the trailing one does not
    ("a.m.", "am"),  # both periods are followed by a non-digit
    ("10:30", "10:30"),  # ":" is not in the list
    ("dont", "don't"),  # contraction table
    ("don't", "don't"),  # "'" is not in the list, so it survives as is
    ("none", "0"),  # number words 0-10, "none" included
    ("eleven", "eleven"),  # ... but nothing above ten
    ("an apple", "apple"),
    ("hi-fi, ok", "hi fi ok"),  # "-" spaced (touches no space), "," deleted (", " is in the text)
    ("1,5 - x", "15 x"),  # digit-comma-digit anywhere -> "-" deleted too even though it touches spaces
    ("  Red\tand\nBlue ", "red and blue"),
])
def test_vqa_normalisation_official_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_period_strip_removes_at_most_32_periods():
    # Upstream passes re.UNICODE (32) as re.sub's count argument: 40 periods -> 8 left.
    assert strip_vqa_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_closed_form_table(k, expected):
    # k of 10 annotators said "dog". Leaving out a matching annotator leaves k-1 matches, any other leaves k:
    # score = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10; k=1 -> 9*(1/3)/10 = 0.3, k=3 -> (3*2/3 + 7)/10 = 0.9.
    answers = ["dog"] * k + ["cat"] * (10 - k)
    assert vqa_score("dog", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_score_fewer_than_ten_answers():
    # answers dog, dog, cat; prediction dog. Leave out dog -> 1 match -> 1/3 (twice); leave out cat -> 2 -> 2/3.
    # mean = (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_score("dog", ["dog", "dog", "cat"]) == pytest.approx(4 / 9)
    assert vqa_score("dog", ["dog"]) == 0.0  # one answer: leaving it out leaves nobody to agree


@pytest.mark.parametrize("prediction, answer", [("two", "2"), ("dont", "don't"), ("a dog", "dog"), ("yes.", "yes"),
                                                ("Yes", "yes")])
def test_vqa_official_quirk_unanimous_answers_are_not_normalised(prediction, answer):
    # Official: normalise only when the annotators disagree. Ten identical answers -> raw comparison -> 0.
    assert vqa_score(prediction, [answer] * 10) == 0.0
    # Normalising always (lmms-eval after its PR #794) matches them.
    assert vqa_score(prediction, [answer] * 10, official_quirk=False) == 1.0
    # With one dissenting annotator the official code normalises: 9 matches -> every leave-one-out >= 3 -> 1.0.
    assert vqa_score(prediction, [answer] * 9 + ["something else"]) == 1.0


def test_vqa_normalises_annotator_answers_too():
    # Annotators wrote "2" x3, "Two" x1, "three" x6. Disagreement -> all normalised -> "2" x4, "3" x6.
    # Prediction "2": k = 4 -> 1.0 (the raw "Two" only counts after normalisation; k = 3 would give 0.9).
    assert vqa_score("2", ["2"] * 3 + ["Two"] + ["three"] * 6) == 1.0


def test_vqa_keeps_decimal_point():
    # "3.5" must not become "35": prediction "35" matches nobody.
    answers = ["3.5"] * 5 + ["4"] * 5
    assert vqa_score("3.5", answers) == 1.0
    assert vqa_score("35", answers) == 0.0


def test_vqa_accuracy_is_mean_over_questions():
    predictions = ["dog", "2", "blue"]
    answers = [["dog"] * 3 + ["cat"] * 7, ["two"] * 9 + ["3"], ["red"] * 10]  # 0.9, 1.0, 0.0
    assert vqa_accuracy(predictions, answers) == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="same length"):
        vqa_accuracy(predictions, answers[:2])
    with pytest.raises(ValueError, match="at least one annotator"):
        vqa_score("dog", [])


def test_grouped_mean():
    result = grouped_mean([1.0, 0.0, 0.5, 1.0], ["yes/no", "number", "number", "other"])
    assert result == {"number": 0.25, "other": 1.0, "yes/no": 1.0, "overall": 0.625}


# ---------------------------------------------------------------------------------------------------------------------
# Exact match and multiple choice


def test_exact_match():
    assert exact_match("Top-left.", "top left")
    assert exact_match("  RED ", "red")
    assert not exact_match("red circle", "red")
    assert exact_match_accuracy(["Red", "blue", "2"], ["red", "green", "2"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("[C]:", "C"),
    ("The answer is B", "B"), ("the answer is (c).", "C"), ("Answer: D", "D"), ("the answer is b.", "B"),
    ("The answer is B because it is red", "B"), ("The answer is a red circle", None),
    ("B. a red circle", "B"), ("(A) blue square", "A"),
    ("I would pick C here.", "C"), ("A is correct", "A"),
    ("banana", None), ("A or B", None), ("E", None),  # E is not among A-D
])
def test_extract_choice_letters(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_from_option_text():
    options = ["blue square", "red circle", "dark red circle"]
    assert extract_choice("red circle", options) == "B"
    assert extract_choice("It is a Red Circle.", options) == "B"
    assert extract_choice("A red circle", options) == "B"  # "A" is an article here, not option A
    assert extract_choice("The answer is a red circle.", options) == "B"
    assert extract_choice("a dark red circle", options) == "C"  # longest option wins over the one it contains
    assert extract_choice("red circle or blue square", options) is None  # two options named
    assert extract_choice("C", options[:2]) is None  # only A and B exist


def test_choice_by_loglik():
    assert choice_by_loglik([-3.0, -2.0, -5.0]) == 1
    assert choice_by_loglik([-2.0, -2.0]) == 0  # tie -> lowest index
    # Summed: -4 > -6 picks option 0. Per token: -4/4 = -1 < -6/12 = -0.5 picks option 1.
    assert choice_by_loglik([-4.0, -6.0], lengths=[4, 12]) == 0
    assert choice_by_loglik([-4.0, -6.0], lengths=[4, 12], length_normalize=True) == 1
    with pytest.raises(ValueError, match="lengths"):
        choice_by_loglik([-1.0], length_normalize=True)
    with pytest.raises(ValueError, match="at least one option"):
        choice_by_loglik([])


# ---------------------------------------------------------------------------------------------------------------------
# POPE (RUCAIBox/POPE evaluate.py)


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a cat.", "no"),
    ("yes. But there is no cat.", "yes"),  # only the first sentence counts
    ("I see no cat", "no"),
    ("no.", "no"),
    ("No,", "no"),  # commas deleted before splitting
    ("NO", "yes"),  # upstream matches only "No", "no", "not": anything else is yes
    ("Nope", "yes"),
    ("", "yes"),
])
def test_pope_parse_official(text, expected):
    assert pope_parse(text) == expected


def test_pope_scores_hand_worked():
    labels = ["yes", "yes", "no", "no", "yes"]
    predictions = ["Yes.", "No, it is not.", "Yes", "yes there is", "Yes"]
    # parsed: yes, no, yes, yes, yes -> TP = 2 (items 0, 4), FN = 1 (item 1), FP = 2 (items 2, 3), TN = 0
    s = pope_scores(predictions, labels)
    assert (s.tp, s.fp, s.tn, s.fn, s.n) == (2, 2, 0, 1, 5)
    assert s.accuracy == pytest.approx(2 / 5)
    assert s.precision == pytest.approx(2 / 4)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))  # = 4/7
    assert s.yes_ratio == pytest.approx(4 / 5)  # from predictions; the labels' yes share would be 3/5


def test_pope_scores_degenerate_and_errors():
    s = pope_scores(["no", "no"], ["yes", "no"])  # nothing predicted yes: precision 0, not a ZeroDivisionError
    assert (s.precision, s.recall, s.f1, s.accuracy, s.yes_ratio) == (0.0, 0.0, 0.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="label 1 must be 'yes' or 'no'"):
        pope_scores(["yes", "yes"], ["yes", "maybe"])


# ---------------------------------------------------------------------------------------------------------------------
# MME


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No.", "no"), ("y", "yes"), ("N", "no"), ("yes, it is", "yes"), ("No, it isn't", "no"),
    ("The answer is yes", "other"),  # the first 4 characters hold neither
    ("not sure", "no"),  # "no" within "not " (upstream behaviour)
    ("x", "other"),
])
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_scores_hand_worked():
    rows = [  # subtask, image, prediction, answer
        ("existence", "e1", "Yes", "Yes"), ("existence", "e1", "No.", "No"),  # both right
        ("existence", "e2", "no", "Yes"), ("existence", "e2", "no", "No"),  # one right
        ("count", "c1", "no", "Yes"), ("count", "c1", "yes", "No"),  # both wrong
        ("code_reasoning", "k1", "yes", "Yes"), ("code_reasoning", "k1", "no", "No"),  # both right
    ]
    result = mme_scores(*zip(*rows))
    existence = result.subtasks["existence"]
    # acc = 3/4 questions = 75, acc+ = 1/2 images = 50, score = 125
    assert (existence.acc, existence.acc_plus, existence.score) == (75.0, 50.0, 125.0)
    assert result.subtasks["count"].score == 0.0
    assert result.subtasks["code_reasoning"].score == 200.0
    assert result.perception == 125.0  # existence + count
    assert result.cognition == 200.0
    assert "OCR" in result.missing and "existence" not in result.missing
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4


def test_mme_acc_plus_needs_all_questions_of_an_image():
    result = mme_scores(["ocr"] * 3, ["i1", "i1", "i2"], ["yes", "no", "yes"], ["yes", "yes", "yes"])
    ocr = result.subtasks["ocr"]
    # acc 2/3; acc+: i1 has one wrong, i2 (unpaired, one question) right -> 1/2
    assert ocr.acc == pytest.approx(200 / 3) and ocr.acc_plus == 50.0 and ocr.unpaired_images == 1
    assert result.perception == pytest.approx(200 / 3 + 50)  # "ocr" matches MME's "OCR" case-insensitively


# ---------------------------------------------------------------------------------------------------------------------
# Caption tokenisation: expected outputs recorded from coco-caption's tokeniser (stanford-corenlp-3.4.1
# PTBTokenizer -preserveLines -lowerCase, then pycocoevalcap's PUNCTUATIONS drop).


@pytest.mark.parametrize("raw, java", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs don't like the cat's toy, do they?", "two dogs do n't like the cat 's toy do they"),
    ("A black-and-white photo of 3.5 cakes at 10:30 a.m.", "a black-and-white photo of 3.5 cakes at 10:30 a.m."),
    ('The "red" bus (parked) near a U.S. flag!', "the red bus -lrb- parked -rrb- near a u.s. flag"),
    ("It's a $5 sign with 50% off & more...", "it 's a $ 5 sign with 50 % off & more"),
    ("A woman's hand holding a cell-phone -- wow; cool: yes", "a woman 's hand holding a cell-phone wow cool yes"),
    ("Kids can't won't shouldn't they're we've I'll she'd I'm",
     "kids ca n't wo n't should n't they 're we 've i 'll she 'd i 'm"),
    ("1,000 people at 5:00 on Main St. in the rain", "1,000 people at 5:00 on main st. in the rain"),
    ("A plate with {rice} and [beans] / salad", "a plate with -lcb- rice -rcb- and -lsb- beans -rsb- / salad"),
    ("Wait... the café is \"open\"?! Yes!!", "wait the café is open ?! yes !!"),
    ("The cats' bowls and James's hat", "the cats bowls and james 's hat"),
    ("don't DON'T Don't cannot gonna", "do n't do n't do n't can not gon na"),
    ("wow.... ok --- no ?? what?. end!?", "wow ok no ?? what end !?"),
    ("The man's 1.5-inch cell.phone", "the man 's 1.5-inch cell.phone"),
    ("the dogs' ball -5 degrees and 5-  dogs at a.m. time", "the dogs ball -5 degrees and 5 dogs at a.m. time"),
    ("and/or 1/2 x,y 1,000.5 e.g. U.S mid-air. o'neil's", "and/or 1/2 x y 1,000.5 e.g. u.s mid-air o'neil 's"),
])
def test_ptb_tokenize_matches_java_tokeniser(raw, java):
    assert ptb_tokenize(raw) == java


# Unicode punctuation, recorded the same way: the Java lexer writes curly/angle quotes, dashes and the ellipsis as
# their ASCII PTB tokens, which the drop list then removes; a curly apostrophe still splits clitics.
UNICODE_PUNCTUATION = [
    ("A \u201cquoted\u201d man\u2019s dog \u2018runs\u2019 \u2014 fast \u2013 slow\u2026 ok",
     "a quoted man 's dog runs fast slow ok"),
    ("A dog\u2014a cat, 10\u201320 people \u2015 wait\u2026", "a dog a cat 10 20 people wait"),
    ("\u00ab Guillemets \u00bb and \u2039single\u203a angles", "guillemets and single angles"),
    ("\u201cHi,\u201d she said\u2026 \u201cIt\u2019s fine.\u201d", "hi she said it 's fine"),
    ("It\u2019s, don\u2019t, can\u2019t, won\u2019t, I\u2019m, we\u2019ve, they\u2019re, she\u2019d, it\u2019ll",
     "it 's do n't ca n't wo n't i 'm we 've they 're she 'd it 'll"),
    ("The cats\u2019 bowls and O\u2019Neil\u2019s hat", "the cats bowls and o\u2019neil 's hat"),
    ("He said \u2018hello\u2019.", "he said hello"),
    ("A well\u2010known dog and a\u2012b", "a well\u2010known dog and a b"),
    ("Wait\u2026. the end\u2026", "wait the end"),
    ("dogs \u00b4s and \u201bx\u201f with \u201elow\u201c and \u201alow\u2018",
     "dogs \u00b4 s and x \u201f with \u201e low and \u201a low"),
    ("prime \u2032 and \u2033 marks, \u22125 degrees", "prime \u2032 and \u2033 marks \u2212 5 degrees"),
]


@pytest.mark.parametrize("raw, java", UNICODE_PUNCTUATION)
def test_ptb_tokenize_drops_unicode_punctuation_as_the_java_tokeniser_does(raw, java):
    assert ptb_tokenize(raw) == java


def test_ptb_tokenize_drops_every_token_of_the_official_punctuation_list():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    # with -lowerCase the Java tokeniser writes brackets as -lrb- etc., which the upper-case entries never match
    dropped = [p for p in ptb.PUNCTUATIONS if not p.startswith("-L") and not p.startswith("-R")]
    for mark in dropped:
        assert ptb_tokenize(f"a {mark} b") == "a b", mark
    assert ptb_tokenize("a ( b )") == "a -lrb- b -rrb-"


def _java_ptb(lines: list[str]) -> list[str] | None:
    """coco-caption's own tokenisation (its jar, its flags, its drop list), or None where Java is not installed."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    if shutil.which("java") is None or not os.path.isfile(jar):
        return None
    command = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    output = subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
                            check=True).stdout
    return [" ".join(w for w in line.split(" ") if w not in ptb.PUNCTUATIONS) for line in output.splitlines()]


def test_recorded_tokenisations_match_the_java_tokeniser_live():
    raws = [raw for raw, _ in UNICODE_PUNCTUATION]
    java = _java_ptb(raws)
    if java is None:
        pytest.skip("java is not installed; the recorded outputs above stand in for it")
    assert java == [expected for _, expected in UNICODE_PUNCTUATION]
    assert [ptb_tokenize(raw) for raw in raws] == java


# ---------------------------------------------------------------------------------------------------------------------
# BLEU (coco-caption): hand-worked


# coco-caption divides by (guessed + 1e-9) and (ref_len + 1e-9): hand values without that smoothing agree to ~1e-9.
SMOOTHED = 1e-8


def test_bleu_hand_worked():
    hyp = "the cat sat on the mat"
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    # hyp length 6; reference lengths 6 and 7 -> closest 6 -> no brevity penalty.
    # clipped matches / guesses: 1-grams the(2, max in a ref 2) cat on mat = 5/6; 2-grams the-cat on-the the-mat
    # = 3/5; 3-grams on-the-mat = 1/4; 4-grams 0/3.
    p = [5 / 6, 3 / 5, 1 / 4]
    b1, b2, b3, b4 = bleu([hyp], [refs])
    assert b1 == pytest.approx(p[0], rel=SMOOTHED)
    assert b2 == pytest.approx(math.sqrt(p[0] * p[1]), rel=SMOOTHED)  # = sqrt(1/2)
    assert b3 == pytest.approx((p[0] * p[1] * p[2]) ** (1 / 3), rel=SMOOTHED)  # = 0.5
    # No 4-gram matches, yet coco-caption's smoothing (correct + 1e-15) / (guessed + 1e-9) keeps BLEU-4 above 0:
    assert b4 == pytest.approx((p[0] * p[1] * p[2] * 1e-15 / 3) ** (1 / 4), rel=1e-6)  # ~8.0e-5
    assert 7e-5 < b4 < 9e-5


def test_bleu_brevity_penalty_and_closest_reference():
    # hyp "the cat" (2 words) vs one 6-word reference: all precisions 1, BP = exp(1 - 6/2) = exp(-2).
    assert bleu(["the cat"], [["the cat sat on the mat"]], n=2) == pytest.approx([math.exp(-2)] * 2, rel=SMOOTHED)
    # 4-word hyp, references of 3 and 5 words are equally close -> the shorter (3) -> ratio 4/3 -> no penalty;
    # choosing 5 would give BP = exp(1 - 5/4).
    b1 = bleu(["a b c d"], [["a b c", "a b c d e"]], n=1)[0]
    assert b1 == pytest.approx(1.0, rel=SMOOTHED)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    # image 1: "a b" vs "a b" -> 2/2 unigrams; image 2: "c d e f" vs "c x y z" -> 1/4. Corpus BLEU-1 = 3/6;
    # the mean of sentence scores would be (1 + 1/4) / 2. Lengths match per image, so no brevity penalty.
    assert bleu(["a b", "c d e f"], [["a b"], ["c x y z"]], n=1)[0] == pytest.approx(3 / 6, rel=SMOOTHED)


def test_bleu_tokenizes_by_default():
    assert bleu(["The cat, sat."], [["the cat sat"]]) == bleu(["the cat sat"], [["the cat sat"]], tokenize=False)
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        bleu(["a"], [[]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        bleu(["a"], ["a b"])  # a bare string, not a list of captions


# ---------------------------------------------------------------------------------------------------------------------
# CIDEr-D: hand-worked


def test_cider_single_image_is_degenerate():
    # One image: df(g) = 1 for every reference n-gram and max(1, 0) = 1 for the others, and #images = 1, so every
    # weight is tf * (log 1 - log 1) = 0: all vectors vanish and even a perfect caption scores 0.
    result = cider_d(["a red circle on the left"], [["a red circle on the left", "a red circle at the left"]])
    assert result.score == 0.0 and result.per_image == [0.0]


def test_cider_identical_captions_two_images():
    # Two images, N = 2, idf = log 2 - log df. df: "a" 2 (weight 0); "cat", "dog", "a cat", "a dog" 1 (weight log 2).
    # Image 1, hyp = ref = "a cat": order 1 vectors {a: 0, cat: l} -> cosine 1; order 2 {a cat: l} -> 1;
    # orders 3, 4 have no n-grams -> 0. Same length -> no penalty. 10 * mean(1, 1, 0, 0) / 1 ref = 5.0.
    result = cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert result.per_image == pytest.approx([5.0, 5.0], rel=1e-12)
    assert result.score == pytest.approx(5.0, rel=1e-12)


def test_cider_clipping_and_length_penalty():
    # As above but image 1's hyp is "a cat sat" ("sat", "cat sat", "a cat sat" appear in no reference: df 0 -> 1 ->
    # full weight l = log 2). Order 1: h = {a: 0, cat: l, sat: l}, r = {a: 0, cat: l}: dot = l^2, |h| = sqrt2 l,
    # |r| = l -> 1/sqrt2. Order 2: h = {a cat: l, cat sat: l}, r = {a cat: l} -> 1/sqrt2. Order 3: r empty -> 0.
    # Length = bigram count (coco-caption): 2 vs 1 -> penalty exp(-1 / (2 * 6^2)).
    expected = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)  # ~3.4868
    result = cider_d(["a cat sat", "a dog"], [["a cat"], ["a dog"]])
    assert result.per_image[0] == pytest.approx(expected, rel=1e-12)
    assert result.per_image[1] == pytest.approx(5.0, rel=1e-12)  # df comes from references only: unchanged
    assert result.score == pytest.approx((expected + 5.0) / 2, rel=1e-12)
    # Clipping: repeating "cat" cannot raise the match above the reference's weight: min(2l, l) * l.
    assert cider_d(["cat cat", "a dog"], [["a cat"], ["a dog"]]).per_image[0] < result.per_image[0]


def test_cider_averages_over_references():
    # Image 1 gets a second, unrelated reference "a bird": df(a) = 2 still, "bird"/"a bird" df 1.
    # sims: vs "a cat" (1, 1, 0, 0), vs "a bird" (0, 0, 0, 0) -> 10 * mean(1, 1, 0, 0) / 2 refs = 2.5.
    result = cider_d(["a cat", "a dog"], [["a cat", "a bird"], ["a dog"]])
    assert result.per_image[0] == pytest.approx(2.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Cross-check against the reference implementation (pycocoevalcap's pure-Python scorers)


def _pycocoevalcap():
    if os.environ.get("CI") == "true":
        import pycocoevalcap  # noqa: F401  (CI installs the test extra: a missing package must fail there)
    else:
        pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    return Bleu, Cider


CAPTIONS = [  # (hypothesis, references)
    ("A red circle on the left.", ["a red circle on the left", "a small red circle at the left", "red circle left"]),
    ("Two blue squares.", ["two blue squares", "a pair of blue squares side by side"]),
    ("A green triangle above a yellow star.", ["a green triangle above a yellow star",
                                              "a yellow star under a green triangle", "green triangle, yellow star"]),
    ("The word CAT written in black.", ["the word cat in black letters", "black text that says cat"]),
    ("A maze with one loop.", ["a maze that has one loop", "a grid maze with a single loop", "maze, one loop"]),
    ("A large blue circle.", ["a big blue circle", "a large blue circle in the middle"]),
    ("", ["an empty grey image"]),
]


def test_bleu_and_cider_match_pycocoevalcap():
    Bleu, Cider = _pycocoevalcap()
    hyps = [ptb_tokenize(h) for h, _ in CAPTIONS]
    refs = [[ptb_tokenize(r) for r in rs] for _, rs in CAPTIONS]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    coco_cider, coco_per_image = Cider().compute_score(gts, res)
    assert bleu(hyps, refs, tokenize=False) == pytest.approx(coco_bleu, rel=1e-12)
    ours = cider_d(hyps, refs, tokenize=False)
    assert ours.score == pytest.approx(float(coco_cider), rel=1e-12)
    assert ours.per_image == pytest.approx([float(x) for x in coco_per_image], rel=1e-12, abs=1e-12)
    # tokenize=True on the raw captions is the same as tokenising first
    assert cider_d([h for h, _ in CAPTIONS], [rs for _, rs in CAPTIONS]).score == pytest.approx(ours.score)


def test_bleu_and_cider_match_pycocoevalcap_on_random_corpora():
    Bleu, Cider = _pycocoevalcap()
    rng = random.Random(0)
    vocab = ["a", "the", "red", "blue", "green", "circle", "square", "on", "left", "right", "of", "small", "is"]
    for _ in range(60):
        n_images = rng.randint(1, 6)
        hyps = [" ".join(rng.choices(vocab, k=rng.randint(0, 9))) for _ in range(n_images)]
        refs = [[" ".join(rng.choices(vocab, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 4))]
                for _ in range(n_images)]
        gts = {i: r for i, r in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        assert bleu(hyps, refs, tokenize=False) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0],
                                                                 rel=1e-12)
        coco_cider, coco_per_image = Cider().compute_score(gts, res)
        ours = cider_d(hyps, refs, tokenize=False)
        assert ours.score == pytest.approx(float(coco_cider), rel=1e-12, abs=1e-12)
        assert ours.per_image == pytest.approx([float(x) for x in coco_per_image], rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Per-class accuracy and confusion matrix


def test_per_class_accuracy():
    labels = ["red", "red", "blue", "blue", "blue"]
    predictions = ["red", "blue", "blue", "purple", "blue"]
    assert per_class_accuracy(labels, predictions) == {"blue": pytest.approx(2 / 3), "red": 0.5}


def test_confusion_matrix_and_markdown():
    labels = ["red", "red", "blue", "blue", "blue"]
    predictions = ["red", "blue", "blue", "purple", "blue"]
    cm = confusion_matrix(labels, predictions)
    assert cm.classes == ["blue", "red"] and cm.columns == ["blue", "red", "other"]
    assert cm.counts == [[2, 0, 1], [1, 1, 0]]  # blue: 2 blue, 1 unseen ("purple") -> other; red: 1 blue, 1 red
    assert confusion_markdown(cm).splitlines() == [
        "| label \\ prediction | blue | red | other |",
        "|---|---:|---:|---:|",
        "| blue | 2 | 0 | 1 |",
        "| red | 1 | 1 | 0 |",
    ]
    fixed = confusion_matrix(labels, predictions, classes=["red", "blue"])
    assert fixed.counts == [[1, 1, 0], [0, 2, 1]]
    with pytest.raises(ValueError, match="'green' is not one of the classes"):
        confusion_matrix(["green"], ["red"], classes=["red"])
    with pytest.raises(ValueError, match="also a class"):
        confusion_matrix(["other"], ["other"])


@pytest.mark.parametrize("answer, kind", [("yes", "yes/no"), ("No.", "yes/no"), ("2", "number"), ("two", "number"),
                                          ("1,000", "number"), ("3.5", "number"), ("none", "number"),
                                          ("red", "other"), ("2 dogs", "other"), ("yes and no", "other")])
def test_answer_type_follows_vqav2(answer, kind):
    assert answer_type(answer) == kind
