"""The "qa" teacher objective: monovlm's ViT learns from the data's own short-answer questions.

A teacher must know what the questions ask about. Masked patch prediction ("mae") gives features that carry each
patch's colours and edges, but nothing in it asks *which shape* a patch belongs to, and a small decoder aligned to
such features still cannot tell a hexagon from a ring. A VQA-style data set already says what matters: its short
answers. Here the ViT is trained, as part of a small question-answering classifier, on every question of the
recipe's data files whose answer has at most three words:

    question words -> embedding -> GRU -> q (width)
    image -> ViT -> patch features (N, W) -> FiLM by q (feature * (1 + gamma(q)) + beta(q)) -> GELU -> linear
          -> max and mean over the patches, with q -> MLP -> one of the training answers

The FiLM-then-max-pool head (as in FiLM, Perez et al. 2018) asks "is what the question names anywhere?", so the
gradient reaches the patches where the object is, and their features must say its colour *and* kind. Only the ViT is
kept (the FiLM head is discarded); its patch features become the align loss's targets. With `head = "lookup"` the
head is an attention instead (`LookupQAHead`: the question's query attends over the patches, as a decoder reads
them), saved beside the ViT (`save_qa_head`): where it looks for a question is look supervision's target
(`monovlm.train.look`). It needs nothing but the user's LLaVA QA records and images; data with captions only has no
short answers and is refused with a pointer to "mae".

Batches are a few images with all of their questions (the ViT runs once per image). A held-out share of the images
(at most 200) measures the head's exact-match accuracy at the end, beside the most frequent answer's share, so a
teacher that learnt nothing shows it.

A teacher that will ask open questions of other images (`open_questions`) also learns when one cannot be answered:
an open question presumes what it names ("What colour is the star?"), and one drawn from another image's often names
something this image lacks. Each batch adds, per image, one open question drawn from another image with the target
"unanswerable" (an extra class). Such a draw is answerable by chance now and then, so the class also fires on some
answerable questions, but on those the image's own questions (always answerable) outweigh it; where what the question
names is absent, every target it ever saw was "unanswerable". The kept answers are those it gives surely and not as
unanswerable.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from monovlm.config import EncoderConfig, VisionConfig
from monovlm.data.datasets import DatasetError, SkipReport
from monovlm.data.image_files import DataImage, DataSource, data_images, iter_pixels
from monovlm.data.images import shift_image
from monovlm.data.processor import IMAGE_MARKER
from monovlm.data.shards import read_data_records
from monovlm.data.yes_no import question_replies, wording_answers, yes_no_word
from monovlm.eval.metrics import answer_type
from monovlm.model.vit import ViT
from monovlm.train.schedule import lr_factor

MAX_ANSWER_WORDS = 3
MAX_ANSWERS = 1000  # answer classes; rarer answers' questions are left out (counted)
_WORD = re.compile(r"[a-z0-9']+")
_PAD, _UNKNOWN = 0, 1

# the loss weight of a drawn question's "unanswerable" target: one in a few draws is answerable by chance, and there
# the image's own questions, at full weight, must still win; where the question names what is absent, the class is
# the only target it ever sees, at any weight
UNANSWERABLE_WEIGHT = 0.1


def question_words(text: str) -> list[str]:
    return _WORD.findall(text.replace("<image>", " ").lower())


def normalise_answer(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class QAPair:
    image: int  # index into the image list
    question: str
    answer: str


def read_qa_pairs(data_root: str | os.PathLike, sources: Sequence[DataSource | str],
                  report: SkipReport | None = None) -> tuple[list[DataImage], list[QAPair]]:
    """Every (image, question, short answer) of the data files' (or shard folders') one-image records, multi-turn
    records giving each of their question-answer pairs; images listed once each, found as the datasets find them
    (`data_images`). Records that are malformed or whose image path is unusable are skipped and counted in `report`;
    answers longer than three words are simply not questions of this kind (a caption, a description) and are not
    counted as faults."""
    images: list[DataImage] = []
    index_of: dict[str, int] = {}
    pairs: list[QAPair] = []
    for source in sources:
        for image in data_images(data_root, [source], report):
            if image.key not in index_of:
                index_of[image.key] = len(images)
                images.append(image)
        file = source if isinstance(source, str) else source[0]
        for record in read_data_records(Path(data_root) / file)[0]:  # its faults were counted just above
            name = record.get("image")
            if not isinstance(name, str) or name not in index_of:
                continue  # text-only, multi-image or skipped records: not this objective's
            for question, answer in question_replies(record):
                if 0 < len(answer.split()) <= MAX_ANSWER_WORDS:
                    pairs.append(QAPair(index_of[name], question, normalise_answer(answer)))
    return images, pairs


class QAHead(nn.Module):
    """(patch features (Q, N, W), question ids (Q, L), lengths (Q,)) -> answer logits (Q, answers). Discarded after
    pretraining."""

    def __init__(self, feature_width: int, vocab: int, answers: int, width: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=_PAD)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.film = nn.Linear(width, 2 * feature_width)
        self.mix = nn.Linear(feature_width, feature_width)
        self.out = nn.Sequential(nn.Linear(2 * feature_width + width, width), nn.GELU(), nn.Linear(width, answers))
        nn.init.zeros_(self.film.weight)  # FiLM starts as the identity
        nn.init.zeros_(self.film.bias)

    def forward(self, patches: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, last = self.gru(packed)
        q = last[0]  # (Q, width)
        gamma, beta = self.film(q).chunk(2, dim=-1)  # (Q, W) each
        h = self.mix(F.gelu(patches * (1 + gamma[:, None]) + beta[:, None]))  # (Q, N, W)
        pooled = torch.cat([h.amax(dim=1), h.mean(dim=1), q], dim=-1)  # (Q, 2W + width)
        return self.out(pooled)


class LookupQAHead(nn.Module):
    """The same contract as `QAHead`, read the way a decoder reads visual tokens: the question's query attends over
    the patches (`heads` heads, keys and values linear in the patch features), and the pooled values with q go
    through an MLP. A teacher trained through it must make what a question names (a kind, a colour, both) findable by
    a dot product at the patches where it is, and its attributes readable there by a linear map: the lookup the
    student's decoder makes from its answer position over the aligned visual tokens. FiLM instead combines
    question and patch nonlinearly at every patch before its max-pool, which no attention layer can copy."""

    def __init__(self, feature_width: int, vocab: int, answers: int, width: int = 128, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.embed = nn.Embedding(vocab, width, padding_idx=_PAD)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(feature_width, width)
        self.value = nn.Linear(feature_width, width)
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, answers))

    def question(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(Q, L), (Q,) -> the GRU's last state (Q, width)."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.gru(packed)[1][0]

    def weights(self, patches: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """patches (Q, N, W), q (Q, width) -> each head's attention over the patches (Q, H, N)."""
        query = self.query(q).unflatten(-1, (self.heads, self.head_dim))  # (Q, H, d)
        keys = self.key(patches).unflatten(-1, (self.heads, self.head_dim))  # (Q, N, H, d)
        return (torch.einsum("qhd,qnhd->qhn", query, keys) * self.head_dim**-0.5).softmax(dim=-1)

    def forward(self, patches: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        q = self.question(ids, lengths)  # (Q, width)
        values = self.value(patches).unflatten(-1, (self.heads, self.head_dim))  # (Q, N, H, d)
        pooled = torch.einsum("qhn,qnhd->qhd", self.weights(patches, q), values).flatten(1)  # (Q, width)
        return self.out(torch.cat([pooled, q], dim=-1))

    def look(self, patches: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Where the head looks for each question: its attention over the patches averaged over heads (Q, N)."""
        return self.weights(patches, self.question(ids, lengths)).mean(dim=1)


QA_HEADS = {"film": QAHead, "lookup": LookupQAHead}
QA_HEAD_WEIGHTS, QA_HEAD_CONFIG = "qa_head.safetensors", "qa_head.json"


def save_qa_head(folder: str | os.PathLike, head: nn.Module, vocabulary: "QuestionVocabulary") -> None:
    """The trained classifier head and its question vocabulary beside the teacher's ViT (what look supervision reads:
    `monovlm.train.look`)."""
    folder = Path(folder)
    kind = next(name for name, cls in QA_HEADS.items() if type(head) is cls)
    config = {"kind": kind, "feature_width": head.key.in_features if kind == "lookup" else head.mix.in_features,
              "vocab": head.embed.num_embeddings, "answers": head.out[-1].out_features,
              "width": head.embed.embedding_dim, "words": vocabulary.index}
    if kind == "lookup":
        config["heads"] = head.heads
    save_file({name: tensor.detach().contiguous() for name, tensor in head.state_dict().items()},
              str(folder / QA_HEAD_WEIGHTS))
    (folder / QA_HEAD_CONFIG).write_text(json.dumps(config))


def load_qa_head(folder: str | os.PathLike) -> tuple[nn.Module, "QuestionVocabulary"]:
    """(head in eval mode, its vocabulary) as `save_qa_head` wrote them; a clear error when the teacher has none."""
    folder = Path(folder)
    if not (folder / QA_HEAD_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} holds no {QA_HEAD_CONFIG}: the \"qa\" teacher saves its classifier head "
                                "when it is pretrained with [align] teacher_head = \"lookup\"")
    config = json.loads((folder / QA_HEAD_CONFIG).read_text())
    options = {"heads": config["heads"]} if config["kind"] == "lookup" else {}
    head = QA_HEADS[config["kind"]](config["feature_width"], config["vocab"], config["answers"], config["width"],
                                    **options)
    head.load_state_dict(load_file(str(folder / QA_HEAD_WEIGHTS)))
    vocabulary = QuestionVocabulary([])
    vocabulary.index = dict(config["words"])
    return head.eval(), vocabulary


class QuestionVocabulary:
    """Question words -> ids, most frequent first; words it has not seen read as one unknown id."""

    def __init__(self, questions: Sequence[str]):
        counts = Counter(word for question in questions for word in question_words(question))
        self.index = {word: i + 2 for i, (word, _) in enumerate(counts.most_common())}

    def __len__(self) -> int:
        return len(self.index) + 2

    def encode(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (Q, L) right-padded, lengths (Q,)."""
        encoded = [[self.index.get(w, _UNKNOWN) for w in question_words(q)] or [_UNKNOWN] for q in questions]
        lengths = torch.tensor([len(ids) for ids in encoded])
        ids = torch.full((len(encoded), int(lengths.max())), _PAD, dtype=torch.long)
        for row, question in enumerate(encoded):
            ids[row, :len(question)] = torch.tensor(question)
        return ids, lengths


@dataclass
class QATask:
    """The short-answer questions of a recipe's data, as a classification task: each image's questions whose answer is
    one of the `MAX_ANSWERS` most frequent (the classes)."""

    images: list[DataImage]
    by_image: dict[int, list[QAPair]]  # image index -> its questions with a class answer
    answers: list[str]  # the classes, most frequent first
    answer_index: dict[str, int]
    left_out: int  # questions whose answer is too rare to be a class

    @property
    def questions(self) -> int:
        return sum(len(pairs) for pairs in self.by_image.values())

    def targets(self, pairs: Sequence[QAPair]) -> torch.Tensor:
        return torch.tensor([self.answer_index[pair.answer] for pair in pairs])


def qa_task(data_root: str | os.PathLike, sources: Sequence[DataSource | str], report: SkipReport | None = None,
            objective: str = "the 'qa' teacher objective", fallback: str = "use teacher_objective = 'mae'") -> QATask:
    """The `QATask` of the data files' (or shard folders') one-image records (`read_qa_pairs`); a clear error naming
    `objective` and the `fallback` when they hold no short-answer question."""
    images, pairs = read_qa_pairs(data_root, sources, report)
    if not pairs:
        files = ", ".join(str(s if isinstance(s, str) else s[0]) for s in sources)
        if report is not None and report.skipped:  # their records were unusable (e.g. every image path escapes)
            raise DatasetError(f"{objective} found no usable question with a short answer in {files}:\n"
                               f"{report.summary()}")
        raise DatasetError(f"{objective} learns from questions with short answers (at most {MAX_ANSWER_WORDS} "
                           f"words), and {files} have none: {fallback}")
    answers = [answer for answer, _ in Counter(pair.answer for pair in pairs).most_common(MAX_ANSWERS)]
    answer_index = {answer: i for i, answer in enumerate(answers)}
    by_image: dict[int, list[QAPair]] = defaultdict(list)
    kept = 0
    for pair in pairs:
        if pair.answer in answer_index:
            by_image[pair.image].append(pair)
            kept += 1
    return QATask(images, dict(by_image), answers, answer_index, len(pairs) - kept)


def square_side(vision: VisionConfig, unit: int | None = None) -> int:
    """The side of the square the classifier reads every image at: the largest multiple of `unit` (default the patch
    size) whose square fits in max_pixels (64 for 64×64 px images and 8 px patches)."""
    unit = unit or vision.patch_size
    return max(unit, int(vision.max_pixels ** 0.5) // unit * unit)


def to_square(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """(3, H, W) -> (3, side, side), the whole image resized (aspect ratio not kept, as CLIP-style towers read
    images), so a batch of images of any sizes is one tensor; an image already that size is returned as it is."""
    if pixels.shape[-2:] == (side, side):
        return pixels
    return F.interpolate(pixels[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]


def pretrain_vit_qa(
    data_root: str | os.PathLike,
    sources: Sequence[DataSource | str],
    config: EncoderConfig,
    vision: VisionConfig,
    steps: int,
    images_per_batch: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    report: dict[str, Any] | None = None,
    teacher_questions: int = 0,
    confidence: float = 0.9,
    even_answers: bool = False,
    autocast: torch.dtype | None = None,
    open_questions: int = 0,
    head: str = "film",
) -> ViT:
    """Train a ViT (patch `vision.patch_size`, images at `vision`'s resize policy) as the image tower of a
    short-answer QA classifier on the data files' questions (see the module docstring); return it in eval mode.
    Unreadable images are skipped and counted. Deterministic for a seed (same torch version and thread count).

    `report`, if given, receives: losses (per step), seconds, questions, images, answers (classes), left_out (questions
    whose answer is too rare to be a class), held_out_accuracy and majority_share (on the held-out images'
    questions), held_out_predictions ((question, answer, predicted) each), skipped (the unreadable-image summary).
    With `teacher_questions` or `open_questions` > 0 it also receives teacher_questions: the trained classifier's own
    yes/no and open questions about every image (`ask_questions`, answers given with at least `confidence`; with
    `even_answers` half of each wording's kept yes/no answers are "yes"); with `open_questions`, unanswerable_own and
    unanswerable_drawn (`_flagged_unanswerable`). `autocast`: the CPU autocast dtype of its forward passes (bfloat16
    where the CPU has native bf16 matmuls: about 1.5× faster; None: float32); the weights stay float32. `head`: the
    classifier's head, "film" (`QAHead`) or "lookup" (`LookupQAHead`)."""
    if head not in QA_HEADS:
        raise ValueError(f"teacher head {head!r} is not one of {tuple(QA_HEADS)}")
    if steps <= 0 or images_per_batch <= 0:
        raise ValueError(f"steps={steps} and images_per_batch={images_per_batch} must be positive")
    if (teacher_questions or open_questions) and report is None:
        raise ValueError("teacher_questions are returned in `report`: pass a dict")
    listing = SkipReport()
    task = qa_task(data_root, sources, listing)
    images, by_image, answers = task.images, task.by_image, task.answers
    image_ids = sorted(by_image)
    random.Random(seed).shuffle(image_ids)
    held_count = min(200, len(image_ids) // 20)  # 5% of the images, at most 200, to see what the head learnt
    held_out, train_ids = image_ids[:held_count], image_ids[held_count:]
    vocabulary = QuestionVocabulary([pair.question for i in train_ids for pair in by_image[i]])

    # open questions drawn from other images, targets "unanswerable" (the extra class `len(answers)`): a teacher that
    # asks open questions learns which of them an image cannot answer (module docstring)
    open_pool = [pair for i in train_ids for pair in by_image[i] if not yes_no_word(pair.answer)] \
        if open_questions else []
    unanswerable = len(answers)
    draw_rng = random.Random(seed + 1)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        vit = ViT(config, vision.patch_size)
        head = QA_HEADS[head](config.width, len(vocabulary), len(answers) + bool(open_pool))
    parameters = [p for m in (vit, head) for p in m.parameters()]
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    skipped = SkipReport()
    cache: dict[int, torch.Tensor | None] = {}

    side = square_side(vision)

    def pixels_of(index: int) -> torch.Tensor | None:
        if index not in cache:  # None marks an unreadable image, read once
            found = list(iter_pixels([images[index]], vision, skipped))
            cache[index] = to_square(found[0][1], side) if found else None
        return cache[index]

    def batch_of(chosen: Sequence[int], shift: bool) -> tuple[list[torch.Tensor], list[QAPair], torch.Tensor]:
        pixels, questions, owner = [], [], []
        max_shift = vision.patch_size // 2
        for index in chosen:
            image = pixels_of(index)
            if image is None:
                continue
            if shift:
                dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
                image = shift_image(image, dy, dx)
            questions += by_image[index]
            owner += [len(pixels)] * len(by_image[index])
            pixels.append(image)
        return pixels, questions, torch.tensor(owner, dtype=torch.long)

    def logits_of(pixels, questions, owner) -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            grids = torch.stack(vit.features(pixels))  # (B, rows, cols, W): images of one size (checked per batch)
            patches = grids.flatten(1, 2)[owner]  # (Q, N, W)
            ids, lengths = vocabulary.encode([pair.question for pair in questions])
            return head(patches, ids, lengths).float()

    losses: list[float] = []
    vit.train()
    head.train()
    started = time.perf_counter()
    order: list[int] = []
    bar = tqdm(range(steps), desc="pretrain vit (qa)", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, max(1, steps // 20), steps, 0.1)
        questions: list[QAPair] = []
        for _ in range(len(train_ids) + 1):  # skip past batches whose images are all unreadable
            if len(order) < images_per_batch:
                order += [train_ids[i] for i in torch.randperm(len(train_ids), generator=generator).tolist()]
            chosen, order = order[:images_per_batch], order[images_per_batch:]
            pixels, questions, owner = batch_of(chosen, shift=True)
            if questions:
                break
        if not questions:
            raise ValueError(f"none of the {len(images)} images could be read:\n{skipped.summary()}")
        targets = task.targets(questions)
        if open_pool:
            drawn, drawn_owner = other_images_questions(questions, owner, open_pool, draw_rng)
            weights = torch.cat([torch.ones(len(questions)), torch.full((len(drawn),), UNANSWERABLE_WEIGHT)])
            targets = torch.cat([targets, torch.full((len(drawn),), unanswerable)])
            logits = logits_of(pixels, questions + drawn, torch.cat([owner, drawn_owner]))
            loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / len(questions)
        else:
            loss = F.cross_entropy(logits_of(pixels, questions, owner), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress and step % 10 == 0:
            bar.set_postfix({"loss": f"{losses[-1]:.3f}"})
    vit.eval()
    head.eval()
    predictions: list[tuple[str, str, str]] = []
    accuracy, majority = _held_out_accuracy(held_out, batch_of, logits_of, answers, predictions)
    flagged = _flagged_unanswerable(held_out, batch_of, logits_of, open_pool, unanswerable,
                                    random.Random(seed + 2)) if open_pool else None
    # one summary line, with or without progress bars: it says whether the teacher learnt anything
    by_type = held_out_by_type(predictions)
    print(f"pretrain vit (qa): {task.questions} questions about {len(image_ids)} images, {len(answers)} answers; "
          f"held-out accuracy {100 * accuracy:.1f}% (most frequent answer {100 * majority:.1f}%)"
          + "".join(f"; {kind} {100 * right / total:.1f}% of {total}" for kind, (right, total) in by_type.items()))
    if flagged is not None:
        print(f"pretrain vit (qa): called unanswerable {100 * flagged[0]:.1f}% of the held-out images' own open "
              f"questions and {100 * flagged[1]:.1f}% of open questions drawn from other images")
    for faults in (listing, skipped):
        if faults.skipped:
            print(f"pretrain vit (qa): {faults.summary()}")
    if report is not None and (teacher_questions > 0 or open_questions > 0):
        asked = ask_questions(task, lambda chosen: batch_of(chosen, shift=False)[0], logits_of, teacher_questions,
                              confidence, seed=seed, progress=progress, even=even_answers,
                              open_per_image=open_questions)
        report["teacher_questions"] = asked
        replies = Counter(r["conversations"][1]["value"] for r in asked)
        print(f"pretrain vit (qa): asked {teacher_questions} yes/no and {open_questions} open questions of each "
              f"image, kept {len(asked)} answers ({replies['yes']} yes, {replies['no']} no, "
              f"{len(asked) - replies['yes'] - replies['no']} open)")
    if report is not None:
        report["qa_head"] = (head, vocabulary)  # `save_qa_head` writes them beside the ViT
        report.update(losses=losses, seconds=time.perf_counter() - started, dtype=str(autocast or torch.float32),
                      questions=task.questions,
                      images=len(image_ids), answers=len(answers), left_out=task.left_out,
                      held_out_accuracy=accuracy, majority_share=majority, held_out_predictions=predictions,
                      held_out_by_type=by_type, held_out_by_answer=held_out_by_answer(predictions),
                      skipped=skipped.summary())
        if flagged is not None:
            report["unanswerable_own"], report["unanswerable_drawn"] = flagged
    return vit


def ask_questions(task: QATask, pixels_of, logits_of, per_image: int, confidence: float, seed: int = 0,
                  progress: bool = False, even: bool = False, open_per_image: int = 0) -> list[dict[str, Any]]:
    """The trained classifier's own questions, as LLaVA records: each image of `task` is asked `per_image` question
    texts drawn from the data's yes/no questions about other images (as often as the data asks each, none it was
    asked already), and answered yes or no (the classifier's two logits). An answer is kept when its probability is
    at least `confidence`; then, within each wording (`Wordings`), answers are dropped at random until "yes" has the
    share it has in the data, so the wording predicts no more and no less than it did, and only the image tells the
    kept answers apart. With `even`, until "yes" has half of each wording's: the wording then predicts none of them.

    With `open_per_image`, each image is also asked that many of the other images' open questions (short answers
    other than yes/no), each answer kept when the classifier gives it at least `confidence` among all answers, and
    not when its most likely class is the one past the answers: "unanswerable" (the teacher of `open_questions`
    learns it, see the module docstring), an open question that presumes what the image lacks.

    `pixels_of(image indices) -> list of (3, S, S)` (unreadable images left out) and `logits_of(pixels, pairs,
    owner)` are the pretraining's own."""
    yes_no_pool = [pair for pairs in task.by_image.values() for pair in pairs if yes_no_word(pair.answer)]
    if not {"yes", "no"} <= set(task.answer_index):
        yes_no_pool = []  # the data never answers one of the two
    open_pool = [pair for pairs in task.by_image.values() for pair in pairs if not yes_no_word(pair.answer)]
    draws = [(pool, count) for pool, count in ((yes_no_pool, per_image), (open_pool, open_per_image)) if pool and count]
    if not draws:
        return []
    yes_no_ids = [task.answer_index["yes"], task.answer_index["no"]] if yes_no_pool else []
    wordings, counts = wording_answers([(pair.question, pair.answer) for pair in yes_no_pool])
    rng = random.Random(seed)
    kept: dict[str, list[tuple[str, int, str]]] = defaultdict(list)  # wording -> (question, image, answer)
    kept_open: list[tuple[str, int, str]] = []
    indices = sorted(task.by_image)
    for start in tqdm(range(0, len(indices), 32), desc="teacher questions", disable=not progress):
        readable = [index for index in indices[start:start + 32] if pixels_of([index])]  # read once, cached
        asked: list[QAPair] = []
        owner: list[int] = []
        yes_no: list[bool] = []  # per asked question: drawn from the yes/no ones
        for row, index in enumerate(readable):
            already = {_plain(pair.question) for pair in task.by_image[index]}  # asked first or in a later turn
            for pool, count in draws:
                drawn = _draw(pool, count, already, rng)
                asked += [QAPair(index, question, "") for question in drawn]
                owner += [row] * len(drawn)
                yes_no += [pool is yes_no_pool] * len(drawn)
        if not asked:
            continue
        with torch.no_grad():
            logits = logits_of(pixels_of(readable), asked, torch.tensor(owner))  # (Q, answers)
        # (Q,) each: a yes/no question is answered yes or no (the two logits), an open one by the most likely class
        p_yes = logits[:, yes_no_ids].softmax(-1)[:, 0].tolist() if yes_no_ids else [0.0] * len(asked)
        p_best, best = (values.tolist() for values in logits.softmax(-1).max(-1))
        for pair, is_yes_no, p, p_answer, answer in zip(asked, yes_no, p_yes, p_best, best):
            if is_yes_no:
                if max(p, 1 - p) >= confidence:
                    kept[wordings(pair.question)].append((pair.question, pair.image, "yes" if p >= 0.5 else "no"))
            elif p_answer >= confidence and answer < len(task.answers):  # not "unanswerable"
                kept_open.append((pair.question, pair.image, task.answers[answer]))
    answered = []
    for wording, answers in kept.items():
        yes_share = 0.5 if even else counts[wording]["yes"] / sum(counts[wording].values())
        answered += _in_proportion(answers, yes_share, rng)
    records = []
    for question, index, answer in answered + kept_open:
        text = question if IMAGE_MARKER in question else f"{IMAGE_MARKER}\n{question}"
        records.append({"id": f"teacher_q{len(records)}", "image": task.images[index].key, "conversations": [
            {"from": "human", "value": text}, {"from": "gpt", "value": answer}]})
    return records


def _draw(pool: list[QAPair], count: int, already: set[str], rng: random.Random) -> list[str]:
    """Up to `count` question texts drawn from `pool` (as often as it holds each), none of `already` (updated)."""
    drawn: list[str] = []
    for _ in range(count * 20):  # draws repeat: a data set's question texts are few
        if len(drawn) == count:
            break
        question = pool[rng.randrange(len(pool))].question
        if _plain(question) not in already:
            already.add(_plain(question))
            drawn.append(question)
    return drawn


def _plain(question: str) -> str:
    """A question's text without the image marker a first turn carries."""
    return question.replace(IMAGE_MARKER, "").strip()


def _in_proportion(answered: list[tuple[str, int, str]], yes_share: float,
                   rng: random.Random) -> list[tuple[str, int, str]]:
    """The largest random subset of `answered` whose share of "yes" is `yes_share` (none when the data's wording is
    always one answer: a teacher's answer there could only add the other)."""
    yes = [a for a in answered if a[2] == "yes"]
    no = [a for a in answered if a[2] == "no"]
    if not 0.0 < yes_share < 1.0:
        return []
    if len(yes) * (1 - yes_share) > len(no) * yes_share:
        yes = rng.sample(yes, int(len(no) * yes_share / (1 - yes_share)))
    else:
        no = rng.sample(no, int(len(yes) * (1 - yes_share) / yes_share))
    return sorted(yes + no, key=lambda a: (a[1], a[0]))


def held_out_by_type(predictions: Sequence[tuple[str, str, str]]) -> dict[str, tuple[int, int]]:
    """(right, asked) per VQA answer type (yes/no, number, other) of (question, answer, predicted) triples."""
    return dict(sorted(_tally(predictions, answer_type).items()))


def held_out_by_answer(predictions: Sequence[tuple[str, str, str]]) -> dict[str, tuple[int, int]]:
    """(right, asked) per reference answer, most asked first: a teacher that never gives some answers (e.g. no kind of
    shape) shows it here even where its overall accuracy looks fine."""
    return dict(sorted(_tally(predictions, lambda answer: answer).items(), key=lambda item: -item[1][1]))


def _tally(predictions: Sequence[tuple[str, str, str]], group) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for _, answer, predicted in predictions:
        key = group(answer)
        right, total = counts.get(key, (0, 0))
        counts[key] = (right + (answer == predicted), total + 1)
    return counts


def other_images_questions(questions: Sequence[QAPair], owner: torch.Tensor, pool: Sequence[QAPair],
                           rng: random.Random) -> tuple[list[QAPair], torch.Tensor]:
    """Per image of a batch (`owner` rows of `questions`), one open question from `pool` about another image and
    not asked of this one (none where a few draws find none): (the questions, their rows)."""
    asked: dict[int, set[str]] = defaultdict(set)
    images: dict[int, int] = {}
    for pair, row in zip(questions, owner.tolist()):
        asked[row].add(_plain(pair.question))
        images[row] = pair.image
    drawn, rows = [], []
    for row, image in images.items():
        for _ in range(8):
            pair = pool[rng.randrange(len(pool))]
            if pair.image != image and _plain(pair.question) not in asked[row]:
                drawn.append(QAPair(image, pair.question, ""))
                rows.append(row)
                break
    return drawn, torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _flagged_unanswerable(held_out: Sequence[int], batch_of, logits_of, pool: Sequence[QAPair], unanswerable: int,
                          rng: random.Random) -> tuple[float, float]:
    """The share of the held-out images' own open questions the head calls unanswerable, and of open questions drawn
    from other images (some of which are answerable by chance)."""
    own = own_flagged = drawn_total = drawn_flagged = 0
    for start in range(0, len(held_out), 32):
        pixels, questions, owner = batch_of(held_out[start:start + 32], shift=False)
        if not questions:
            continue
        drawn, drawn_owner = other_images_questions(questions, owner, pool, rng)
        predicted = logits_of(pixels, questions + drawn, torch.cat([owner, drawn_owner])).argmax(dim=-1)
        is_open = torch.tensor([not yes_no_word(pair.answer) for pair in questions] + [False] * len(drawn))
        flagged = predicted == unanswerable
        own += int(is_open.sum())
        own_flagged += int((flagged & is_open).sum())
        drawn_total += len(drawn)
        drawn_flagged += int(flagged[len(questions):].sum())
    return own_flagged / max(own, 1), drawn_flagged / max(drawn_total, 1)


@torch.no_grad()
def _held_out_accuracy(held_out: Sequence[int], batch_of, logits_of, answers: Sequence[str],
                       predictions: list[tuple[str, str, str]]) -> tuple[float, float]:
    """(exact-match accuracy of the head, share of the most frequent training answer) on the held-out images'
    questions; (0, 0) when none are held out. Each (question, answer, predicted) is appended to `predictions`."""
    correct = total = majority = 0
    for start in range(0, len(held_out), 32):
        pixels, questions, owner = batch_of(held_out[start:start + 32], shift=False)
        if not questions:
            continue
        logits = logits_of(pixels, questions, owner)[:, :len(answers)]  # each asks of its own image: answerable
        predicted = logits.argmax(dim=-1).tolist()
        predictions += [(pair.question, pair.answer, answers[p]) for p, pair in zip(predicted, questions)]
        correct += sum(answers[p] == pair.answer for p, pair in zip(predicted, questions))
        majority += sum(pair.answer == answers[0] for pair in questions)
        total += len(questions)
    return (correct / total, majority / total) if total else (0.0, 0.0)
