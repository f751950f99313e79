"""Readers for the standard benchmark formats, from local files only: each returns `EvalSample`s and a `SkipReport`.

| name            | files                                                                       | category        |
|-----------------|-----------------------------------------------------------------------------|-----------------|
| `vqav2`         | `v2_OpenEnded_mscoco_*_questions.json` (+ `v2_mscoco_*_annotations.json`),  | answer_type     |
|                 | images `COCO_{split}_{image_id:012d}.jpg`                                   |                 |
| `gqa`           | `*_questions.json` {qid: {imageId, question, answer, fullAnswer, types}}    | structural type |
| `pope`          | JSON lines {question_id, image, text, label, (category)}                    | POPE split      |
| `mme`           | the release folder (`<subtask>/...txt`: question<TAB>answer) or a flat TSV  | subtask         |
| `coco_captions` | `captions_*.json` {"images": [{id, file_name}], "annotations": [...]}       | "all"           |
| `llava`         | LLaVA JSON list / JSONL with conversations (human/gpt)                      | category or     |
|                 |                                                                             | answer type     |
| `synthetic`     | `instruct_{split}.json` written by `monovlm.data.synthetic.synthesize`      | skill category  |

Rules shared by all readers:
- A file that is missing, unreadable or of the wrong overall shape raises `DatasetError` naming the file and why.
- A record that cannot be used (missing field, wrong type, image not on disk, duplicate id) is skipped and counted
  in the `SkipReport` with a short reason ("missing question", "image missing", ...) and a detail naming it;
  reading never stops for a bad record.
- Images are only checked to exist (not decoded): decoding is the harness's job, with the one safe loader. An image
  path is joined to the image root (default: the folder of the file read) and must stay inside it with its links
  resolved: `monovlm.data.images.image_path_under`, the rule training applies too (a link farm into a shared
  dataset store is refused; pass the store as the image root). Only regular files count as images.
- Order is the file's order (folders: sorted names); `limit` keeps the first `limit` usable samples and stops there.
- Questions and references lose surrounding whitespace and image markers; their text is otherwise unchanged
  (normalisation belongs to each metric, which differ: see reference/evaluation.md §1.3).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monovlm.data.datasets import DatasetError, SkippedSample, SkipReport
from monovlm.data.images import ImagePathError, image_path_under
from monovlm.data.processor import IMAGE_MARKER, ROLE_NAMES
from monovlm.data.synthetic import qa_file
from monovlm.eval.metrics import answer_type
from monovlm.eval.samples import EvalSample, ReadResult

PathLike = str | os.PathLike

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # lmms-eval coco_cap wording
MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")  # tried in this order for <stem>.txt
POPE_SPLITS = ("adversarial", "popular", "random")
_INLINE_IMAGE_CHARS = 1024  # an "image" value this long is inline data (base64 in some TSVs), not a path

__all__ = [
    "CAPTION_PROMPT", "READERS", "read", "read_coco_captions", "read_gqa", "read_llava", "read_mme", "read_pope",
    "read_synthetic", "read_vqav2",
]


# ---------------------------------------------------------------------------------------------------------------
# Shared machinery


class _Bad(Exception):
    """One record is unusable: skipped with `reason` (a short category) and `detail` (the full message)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Collector:
    """Keeps samples in order up to `limit`, counts skips, refuses duplicate ids."""

    def __init__(self, limit: int | None):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
        self.limit = limit
        self.samples: list[EvalSample] = []
        self.report = SkipReport()
        self._ids: set[str] = set()

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.samples) >= self.limit

    def skip(self, where: str, reason: str, detail: str) -> None:
        detail = detail if len(detail) <= 300 else detail[:300] + "..."  # a bad value may be a whole base64 image
        self.report.record(SkippedSample(where, reason, detail))

    def take(self, where: str, build: Callable[..., EvalSample], *args: Any) -> None:
        """Keep build(*args), or count why it cannot be used."""
        try:
            sample = build(*args)
        except _Bad as bad:
            self.skip(where, bad.reason, bad.detail)
            return
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # a record shape the checks did not foresee
            self.skip(where, "invalid record", f"{type(error).__name__}: {error}")
            return
        if sample.id in self._ids:
            self.skip(where, "duplicate id", f"id {sample.id!r} was already read; the first one is kept")
            return
        self._ids.add(sample.id)
        self.report.record(sample)  # counts it as used (SkipReport counts anything not a SkippedSample)
        self.samples.append(sample)

    def result(self) -> ReadResult:
        return ReadResult(self.samples, self.report)


class _Images:
    """Joins image names to a root folder and checks the file is there."""

    def __init__(self, root: PathLike):
        self.root = Path(os.path.normpath(os.path.abspath(root)))
        if not self.root.is_dir():
            why = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"image folder {self.root} {why}")

    def path(self, name: Any, field: str = "image") -> Path:
        if not isinstance(name, str) or not name.strip():
            raise _Bad(f"invalid {field}", f"{field!r} must be a non-empty path string, got {name!r}")
        try:
            path = image_path_under(self.root, name)
        except ImagePathError as error:
            reason = "image path escapes root" if "escapes" in str(error) else "invalid image path"
            raise _Bad(reason, str(error)) from error
        if not path.is_file():  # is_file: a regular file (a FIFO or a device is not an image)
            raise _Bad("image missing", f"image {path} " + ("is not a regular file" if path.exists()
                                                            else "does not exist"))
        return path


def _file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"{what} file {path} is not a file")
    return path


def _read_text(path: PathLike, what: str) -> str:
    path = _file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{what} file {path} is not UTF-8 text ({error})") from error
    except OSError as error:
        raise DatasetError(f"{what} file {path} cannot be read ({error.strerror or error})") from error


def _read_json(path: PathLike, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{what} file {path} is not valid JSON ({error})") from error


def _records(path: PathLike, what: str) -> list[tuple[int, str, Any]]:
    """(position, where, record) for a JSON list or JSON-lines file, whatever its extension (POPE's official
    `coco_pope_random.json` is JSON lines). A malformed line's record is a `_Bad`, to be counted where it falls."""
    text = _read_text(path, what)
    name = Path(path).name
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise DatasetError(f"{what} file {path} is not valid JSON ({error})") from error
        whole = None  # JSON lines: a malformed line is one bad record
    else:
        if isinstance(whole, list):
            return [(i, f"{name} record {i}", r) for i, r in enumerate(whole)]
        if not (isinstance(whole, dict) and len(text.strip().splitlines()) == 1):
            raise DatasetError(f"{what} file {path} must hold a JSON list or JSON lines (one object per line)")
    entries: list[tuple[int, str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as error:
            record = _Bad("malformed line", f"not JSON ({error})")
        entries.append((len(entries), f"{name} line {number}", record))
    return entries


def _object(record: Any) -> dict[str, Any]:
    if isinstance(record, _Bad):
        raise record
    if not isinstance(record, dict):
        raise _Bad("malformed record", f"expected a JSON object, got {type(record).__name__}")
    return record


def _text(record: dict[str, Any], key: str, name: str | None = None) -> str:
    """record[key] as a non-empty stripped string; `name` is how the skip reason calls it (default: key)."""
    name = name or key
    if key not in record or record[key] is None:
        raise _Bad(f"missing {name}", f"no {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"invalid {name}", f"{key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _ident(record: dict[str, Any], key: str) -> int | str:
    """An id field: an integer or a non-empty string (bool is not an id)."""
    if key not in record or record[key] is None:
        raise _Bad(f"missing {key}", f"no {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise _Bad(f"invalid {key}", f"{key!r} must be an integer or a non-empty string, got {value!r}")
    return value


def _question(text: str, key: str = "question") -> str:
    question = text.replace(IMAGE_MARKER, "").strip()
    if not question:
        raise _Bad("missing question", f"{key!r} holds nothing but image markers")
    return question


def _where(base: str, record: Any, key: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    return f"{base} ({key}={value})" if isinstance(value, (int, str)) and not isinstance(value, bool) else base


def _root(image_root: PathLike | None, default: Path) -> _Images:
    return _Images(image_root if image_root is not None else default)


# ---------------------------------------------------------------------------------------------------------------
# VQAv2


def _vqa_image_split(questions: dict[str, Any], path: Path) -> str:
    """COCO image split in the file names: the file's data_subtype (or its name); test-dev images live in test."""
    subtype = questions.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        match = re.search(r"(train|val|test-dev|test)\d{4}", path.name)
        if match is None:
            raise DatasetError(
                f"cannot tell the COCO image split of {path}: it has no 'data_subtype' and its name has none; "
                "pass image_split (e.g. 'val2014')"
            )
        subtype = match.group(0)
    return subtype.replace("test-dev", "test")


_VQA_META = ("question_type", "answer_type", "multiple_choice_answer")


def _vqa_answers(annotation: Any, qid: int | str, image_id: int) -> dict[str, Any]:
    if not isinstance(annotation, dict):
        raise _Bad("invalid annotation", f"annotation of question {qid} is not an object")
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        raise _Bad("invalid annotation", f"annotation of question {qid} has no 'answers' list")
    texts = []
    for answer in answers:
        text = answer.get("answer") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise _Bad("invalid annotation", f"annotation of question {qid} has an answer {answer!r} without text")
        texts.append(text.strip())
    if annotation.get("image_id", image_id) != image_id:
        other = annotation.get("image_id")
        raise _Bad("invalid annotation", f"annotation of question {qid} is for image {other}, not {image_id}")
    return {"answers": texts, **{k: annotation.get(k) for k in _VQA_META}}


def read_vqav2(
    questions: PathLike,
    annotations: PathLike | None = None,
    image_root: PathLike | None = None,
    image_split: str | None = None,
    limit: int | None = None,
) -> ReadResult:
    """VQAv2 questions (+ annotations): one sample per question, answers = the 10 annotator answers in order.

    Without `annotations` (test-dev) samples have no answers (predictions can still be written for the server).
    Images are `image_root/COCO_{image_split}_{image_id:012d}.jpg` (image_root defaults to the questions file's
    folder; image_split to its `data_subtype`, with test-dev2015 -> test2015). Category is the answer_type;
    meta holds question_id, image_id, question_type, answer_type and multiple_choice_answer.
    An annotation entry without a usable question_id cannot belong to any question: it is counted as a skip.
    """
    collector = _Collector(limit)
    qpath = _file(questions, "VQAv2 questions")
    data = _read_json(qpath, "VQAv2 questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DatasetError(f"VQAv2 questions file {qpath} must be a JSON object with a 'questions' list")
    split = image_split or _vqa_image_split(data, qpath)
    images = _root(image_root, qpath.parent)

    by_question: dict[int | str, Any] | None = None
    annotations_name = None
    if annotations is not None:
        apath = _file(annotations, "VQAv2 annotations")
        annotations_name = apath.name
        annotation_data = _read_json(apath, "VQAv2 annotations")
        if not isinstance(annotation_data, dict) or not isinstance(annotation_data.get("annotations"), list):
            raise DatasetError(f"VQAv2 annotations file {apath} must be a JSON object with an 'annotations' list")
        by_question = {}
        for index, annotation in enumerate(annotation_data["annotations"]):
            qid = annotation.get("question_id") if isinstance(annotation, dict) else None
            if isinstance(qid, (int, str)) and not isinstance(qid, bool):
                by_question.setdefault(qid, annotation)
            else:
                collector.skip(f"{apath.name} annotation {index}", "invalid annotation",
                               f"annotation without a usable question_id: {annotation!r}"[:200])

    def build(record: Any) -> EvalSample:
        record = _object(record)
        qid = _ident(record, "question_id")
        image_id = record.get("image_id")
        if image_id is None:
            raise _Bad("missing image_id", "no 'image_id'")
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
            raise _Bad("invalid image_id", f"'image_id' must be a non-negative integer, got {image_id!r}")
        question = _question(_text(record, "question"))
        meta: dict[str, Any] = {"question_id": qid, "image_id": image_id}
        answers: list[str] = []
        category = "all"
        if by_question is not None:
            if qid not in by_question:
                raise _Bad("no annotation", f"question {qid} has no annotation in {annotations_name}")
            found = _vqa_answers(by_question[qid], qid, image_id)
            answers = found.pop("answers")
            meta.update(found)
            category = found["answer_type"] if isinstance(found["answer_type"], str) else "all"
        image = images.path(f"COCO_{split}_{image_id:012d}.jpg")
        return EvalSample(id=str(qid), question=question, image=image, answers=answers, category=category, meta=meta)

    for index, record in enumerate(data["questions"]):
        if collector.full:
            break
        collector.take(_where(f"{qpath.name} question {index}", record, "question_id"), build, record)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# GQA


def read_gqa(questions: PathLike, image_root: PathLike | None = None, limit: int | None = None) -> ReadResult:
    """GQA `*_questions.json` ({qid: {imageId, question, answer, fullAnswer, types}}), in the file's order.

    Images are `image_root/{imageId}.jpg` (default: the questions file's folder). Category is types.structural
    ("all" when absent); meta holds image_id, full_answer, semantic and detailed (None when absent).
    Records without an answer (the test and challenge splits) are skipped as "missing answer".
    """
    collector = _Collector(limit)
    path = _file(questions, "GQA questions")
    data = _read_json(path, "GQA questions")
    if not isinstance(data, dict):
        raise DatasetError(f"GQA questions file {path} must be a JSON object mapping question ids to questions")
    images = _root(image_root, path.parent)

    def build(qid: str, record: Any) -> EvalSample:
        record = _object(record)
        image_id = _text(record, "imageId")
        question = _question(_text(record, "question"))
        answer = _text(record, "answer")
        types = record.get("types")
        types = types if isinstance(types, dict) else {}
        structural = types.get("structural")
        meta = {
            "image_id": image_id,
            "full_answer": record.get("fullAnswer"),
            "semantic": types.get("semantic"),
            "detailed": types.get("detailed"),
        }
        image = images.path(f"{image_id}.jpg")
        category = structural if isinstance(structural, str) and structural else "all"
        return EvalSample(id=qid, question=question, image=image, answers=[answer], category=category, meta=meta)

    for qid, record in data.items():
        if collector.full:
            break
        collector.take(f"{path.name} question {qid}", build, qid, record)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# POPE


def read_pope(
    path: PathLike, image_root: PathLike | None = None, split: str | None = None, limit: int | None = None
) -> ReadResult:
    """POPE JSON lines {question_id, image, text, label, (category)} (a JSON list of them also works).

    `question`/`answer` are accepted in place of `text`/`label` (the lmms-eval column names). The label must be
    yes or no (any case); answers = [label] in lowercase and meta = {question_id, label}. Category is the record's
    `category`, else `split`, else the split named in the file name (coco_pope_random -> "random"), else "all".
    Images are joined to image_root (default: the file's folder).
    """
    collector = _Collector(limit)
    path = _file(path, "POPE questions")
    match = re.search("|".join(POPE_SPLITS), path.name.lower())
    default_category = split or (match.group(0) if match else "all")
    entries = _records(path, "POPE questions")
    images = _root(image_root, path.parent)

    def build(record: Any) -> EvalSample:
        record = _object(record)
        qid = _ident(record, "question_id")
        question = _question(_text(record, "text" if "text" in record else "question", "question"))
        label = _text(record, "label" if "label" in record else "answer", "label").lower()
        if label not in ("yes", "no"):
            raise _Bad("invalid label", f"the label must be yes or no, got {label!r}")
        category = record.get("category")
        category = category.strip() if isinstance(category, str) and category.strip() else default_category
        image = images.path(record.get("image"))
        return EvalSample(id=str(qid), question=question, image=image, answers=[label], category=category,
                          meta={"question_id": qid, "label": label})

    for _, where, record in entries:
        if collector.full:
            break
        collector.take(_where(where, record, "question_id"), build, record)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# MME


def _mme_line(line: str) -> tuple[str, str]:
    parts = [part.strip() for part in line.strip().split("\t")]
    if len(parts) != 2 or not all(parts):
        raise _Bad("malformed line", f"expected 'question<TAB>answer', got {line.strip()!r}"[:200])
    return parts[0], parts[1]


def _mme_sample(subtask: str, images: _Images, image: Path | None, k: int, line: str, missing: str) -> EvalSample:
    question, answer = _mme_line(line)
    if image is None:
        raise _Bad("image missing", missing)
    key = f"{subtask}/{image.name}"  # the name as the release writes it, whatever a link points at
    return EvalSample(id=f"{key}:{k}", question=_question(question),
                      image=images.path(str(image.relative_to(images.root))), answers=[answer], category=subtask,
                      meta={"image_key": key})


def _mme_folder(root: Path, collector: _Collector) -> None:
    """The official release: <subtask>/questions_answers_YN/<stem>.txt with <subtask>/images/<stem>.<ext>, or
    <subtask>/<stem>.txt beside <subtask>/<stem>.<ext>; two lines question<TAB>Yes|No per image."""
    plan = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        split_layout = (folder / "questions_answers_YN").is_dir()
        text_dir = folder / "questions_answers_YN" if split_layout else folder
        image_dir = folder / "images" if split_layout else folder
        texts = sorted(text_dir.glob("*.txt"))
        if texts:
            plan.append((folder.name, texts, image_dir))
    if not plan:
        raise DatasetError(
            f"no MME subtask folders under {root}: expected <subtask>/questions_answers_YN/*.txt with "
            "<subtask>/images/, or <subtask>/*.txt beside the images (point at the folder that holds the subtasks)"
        )
    images = _Images(root)
    for subtask, texts, image_dir in plan:
        for text_file in texts:
            if collector.full:
                return
            where = f"{subtask}/{text_file.name}"
            try:
                lines = [line for line in text_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as error:
                collector.skip(where, "unreadable question file", f"{text_file}: {error}")
                continue
            image = next((images.root / image_dir.relative_to(root) / (text_file.stem + s) for s in MME_IMAGE_SUFFIXES
                          if (image_dir / (text_file.stem + s)).is_file()), None)

            missing = f"no image {text_file.stem}({'|'.join(MME_IMAGE_SUFFIXES)}) in {image_dir}"
            for k, line in enumerate(lines):
                if collector.full:
                    return
                collector.take(f"{where} line {k + 1}", _mme_sample, subtask, images, image, k, line, missing)


def _mme_tsv(path: Path, image_root: PathLike | None, collector: _Collector) -> None:
    """A flat TSV with a header: index and/or question_id, image_path or image, question, answer, (category)."""
    text = _read_text(path, "MME TSV")
    reader = csv.reader(io.StringIO(text), delimiter="\t")  # csv, not split("\t"): pandas quotes fields with quotes
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise DatasetError(f"MME TSV file {path} has an unreadable header ({error})") from error
    if not header:
        raise DatasetError(f"MME TSV file {path} is empty: expected a header row")
    columns = [name.strip().lower() for name in header]
    image_column = "image_path" if "image_path" in columns else "image"
    missing = [c for c in ("question", "answer", image_column) if c not in columns]
    if missing:
        raise DatasetError(f"MME TSV file {path} lacks the column(s) {', '.join(missing)}; it has {', '.join(columns)}")
    images = _root(image_root, path.parent)
    seen: dict[str, int] = {}  # question_id -> rows so far (lmms-eval's question_id is the image key: 2 rows each)

    def build(row: list[str]) -> EvalSample:
        if len(row) != len(columns):
            raise _Bad("malformed row", f"{len(row)} fields for {len(columns)} columns")
        fields = dict(zip(columns, row))
        question = _question(_text(fields, "question"))
        answer = _text(fields, "answer")
        name = fields[image_column].strip()
        if len(name) > _INLINE_IMAGE_CHARS:
            raise _Bad("inline image data", f"column {image_column!r} holds {len(name)} characters of inline data "
                                            "(base64?), not a file path; this reader needs image files")
        image = images.path(name, image_column)
        image_key = fields.get("question_id", "").strip() or name
        if fields.get("index", "").strip():
            sample_id = fields["index"].strip()
        elif fields.get("question_id", "").strip():
            sample_id = f"{image_key}:{seen.get(image_key, 0)}"
            seen[image_key] = seen.get(image_key, 0) + 1
        else:
            raise _Bad("missing index", "the row has neither 'index' nor 'question_id'")
        category = fields.get("category", "").strip() or "all"
        return EvalSample(id=sample_id, question=question, image=image, answers=[answer], category=category,
                          meta={"image_key": image_key})

    while not collector.full:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            collector.skip(f"{path.name} line {reader.line_num}", "malformed row", str(error))
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        collector.take(f"{path.name} line {reader.line_num}", build, row)


def read_mme(path: PathLike, image_root: PathLike | None = None, limit: int | None = None) -> ReadResult:
    """MME: the official release folder (the one holding the subtask folders) or a flat TSV file.

    Folder: subtasks in sorted order, question files sorted within each; the answer is kept as written ("Yes").
    Ids are "<subtask>/<image file>:<k>" (k = 0, 1 for the image's two questions); meta["image_key"] =
    "<subtask>/<image file>" pairs the two questions of one image for acc+. The question keeps MME's own
    "Please answer yes or no." (it is part of the data; a task may swap it for its post-prompt).
    TSV: ids are the `index` column, else "<question_id>:<k>" (lmms-eval's question_id names the image, so it
    repeats); meta["image_key"] is question_id, else the image path as written; images are joined to image_root
    (default: the TSV's folder); category is the `category` column ("all" when absent).
    """
    collector = _Collector(limit)
    path = Path(path)
    if path.is_dir():
        if image_root is not None:
            raise ValueError("image_root applies to an MME TSV only: the release folder holds its own images")
        _mme_folder(path, collector)
    else:
        _mme_tsv(_file(path, "MME"), image_root, collector)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# COCO captions


def read_coco_captions(
    path: PathLike, image_root: PathLike | None = None, prompt: str = CAPTION_PROMPT, limit: int | None = None
) -> ReadResult:
    """COCO `captions_*.json`: one sample per entry of "images" (in order), answers = all its captions in order.

    The question is `prompt` for every image; id is the image id; meta = {image_id, file_name}. Images are joined
    to image_root (default: the file's folder). An image whose caption entries include a bad one is skipped (a
    partial reference set would change its score); a caption entry naming no usable image id is counted as a skip;
    captions of images not listed in "images" are not part of this set and are ignored.
    """
    collector = _Collector(limit)
    path = _file(path, "COCO captions")
    data = _read_json(path, "COCO captions")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"COCO captions file {path} must be a JSON object with an 'images' list")
    if not isinstance(data.get("annotations"), list):
        raise DatasetError(f"COCO captions file {path} has no 'annotations' list (an image-info file has no captions)")
    images = _root(image_root, path.parent)
    question = _question(prompt, "prompt")

    captions: dict[int | str, list[str]] = {}
    bad: dict[int | str, str] = {}  # image id -> why one of its captions is unusable
    for index, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            collector.skip(f"{path.name} annotation {index}", "invalid annotation",
                           f"caption without a usable image_id: {annotation!r}"[:200])
            continue
        caption = annotation.get("caption")
        if isinstance(caption, str) and caption.strip():
            captions.setdefault(image_id, []).append(caption.strip())
        else:
            bad.setdefault(image_id, f"annotation {index} has caption {caption!r}")

    def build(record: Any) -> EvalSample:
        record = _object(record)
        image_id = _ident(record, "id")
        file_name = _text(record, "file_name")
        if image_id in bad:
            raise _Bad("invalid caption", bad[image_id])
        if image_id not in captions:
            raise _Bad("no captions", f"image {image_id} has no caption in {path.name}")
        image = images.path(file_name, "file_name")
        return EvalSample(id=str(image_id), question=question, image=image, answers=list(captions[image_id]),
                          meta={"image_id": image_id, "file_name": file_name})

    for index, record in enumerate(data["images"]):
        if collector.full:
            break
        collector.take(_where(f"{path.name} image {index}", record, "id"), build, record)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-format records and the synthetic suite

_LLAVA_FIELDS = ("id", "image", "images", "conversations", "question", "answer", "answers", "category", "choices",
                 "options")


def _first_exchange(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """The first user turn and the assistant turn after it (later turns are not evaluated)."""
    conversations = record.get("conversations")
    if conversations is None:
        return None, None
    if not isinstance(conversations, list):
        raise _Bad("invalid conversations", "'conversations' must be a list of turns")
    question = answer = None
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _Bad("invalid conversations", f"turn {number} is not an object with a string 'value'")
        role = ROLE_NAMES.get(turn.get("from", ""))
        if question is None and role == "user":
            question = turn["value"]
        elif question is not None and role == "assistant":
            answer = turn["value"]
            break
    return question, answer


def _strings(record: dict[str, Any], key: str) -> list[str]:
    value = record[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Bad(f"invalid {key}", f"{key!r} must be a non-empty list of non-empty strings, got {value!r}"[:200])
    return [v.strip() for v in value]


def _llava_image(record: dict[str, Any], images: _Images) -> Path | None:
    entry = record.get("image", record.get("images"))
    if entry is None:
        return None
    if isinstance(entry, list):
        if len(entry) != 1:
            raise _Bad("multiple images", f"{len(entry)} images; an eval sample has at most one")
        entry = entry[0]
    return images.path(entry)


def _llava_sample(record: Any, position: int, images: _Images) -> EvalSample:
    record = _object(record)
    sample_id = str(_ident(record, "id")) if "id" in record else str(position)
    turn_question, turn_answer = _first_exchange(record)
    if "question" in record:
        question = _question(_text(record, "question"))
    elif turn_question is not None:
        question = _question(turn_question, "conversations")
    else:
        raise _Bad("missing question", "no 'question' and no user turn in 'conversations'")
    if "answers" in record:
        answers = _strings(record, "answers")
    elif "answer" in record:
        answers = [_text(record, "answer")]
    elif turn_answer is not None and turn_answer.strip():
        answers = [turn_answer.strip()]
    else:
        raise _Bad("missing answer", "no 'answers', no 'answer' and no assistant turn after the question")
    choice_key = "choices" if "choices" in record else "options" if "options" in record else None
    choices = _strings(record, choice_key) if choice_key else None
    if "category" in record:
        category = _text(record, "category")
    else:  # no grouping of its own: one row per answer type, as VQAv2 reports, says more than one "all" row
        category = "multiple choice" if choices else answer_type(answers[0])
    image = _llava_image(record, images)
    meta = {k: v for k, v in record.items() if k not in _LLAVA_FIELDS}
    return EvalSample(id=sample_id, question=question, image=image, answers=answers, category=category,
                      choices=choices, meta=meta)


def read_llava(path: PathLike, image_root: PathLike | None = None, limit: int | None = None) -> ReadResult:
    """LLaVA-format records (JSON list or JSONL): the first user turn is the question, the references are
    `answers` (a list), else `answer`, else the first assistant turn after it.

    A record's own `question` wins over its conversations. id is the record's `id`, else its 0-based position.
    Category is `category`; without one, the first reference's answer type as VQAv2 names them ("yes/no",
    "number", "other"; "multiple choice" for records with options); `choices` (or `options`) become the options;
    every other field goes to meta. A record may have no image (text-only) or one; more than one is skipped.
    """
    collector = _Collector(limit)
    path = _file(path, "LLaVA data")
    entries = _records(path, "LLaVA data")
    images = _root(image_root, path.parent)
    for position, where, record in entries:
        if collector.full:
            break
        collector.take(_where(where, record, "id"), _llava_sample, record, position, images)
    return collector.result()


def read_synthetic(folder: PathLike, split: str = "test", limit: int | None = None) -> ReadResult:
    """The QA suite `monovlm.data.synthetic.synthesize` writes: `folder/instruct_test.json` (`split` "test") or
    `folder/instruct.json` ("train").

    Each record must carry id, image, category, question and answer; category is the skill (attribute, counting,
    spatial, reading, existence, maze) and meta holds `pope_split` for existence questions (empty otherwise).
    """
    collector = _Collector(limit)
    folder = Path(folder)
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"synthetic data folder {folder} {why}")
    path = folder / qa_file(split)
    entries = _records(_file(path, "synthetic instruct"), "synthetic instruct")
    images = _Images(folder)

    def build(record: Any) -> EvalSample:
        record = _object(record)
        fields = {key: _text(record, key) for key in ("id", "image", "category", "question", "answer")}
        meta = {"pope_split": record["pope_split"]} if "pope_split" in record else {}
        return EvalSample(id=fields["id"], question=_question(fields["question"]), image=images.path(fields["image"]),
                          answers=[fields["answer"]], category=fields["category"], meta=meta)

    for _, where, record in entries:
        if collector.full:
            break
        collector.take(_where(where, record, "id"), build, record)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# Registry

READERS: dict[str, Callable[..., ReadResult]] = {
    "vqav2": read_vqav2,
    "gqa": read_gqa,
    "pope": read_pope,
    "mme": read_mme,
    "coco_captions": read_coco_captions,
    "llava": read_llava,
    "synthetic": read_synthetic,
}


def read(name: str, **kwargs: Any) -> ReadResult:
    """READERS[name](**kwargs), e.g. read("pope", path="coco_pope_random.json", image_root="val2014")."""
    if name not in READERS:
        raise ValueError(f"unknown benchmark reader {name!r}; known readers: {', '.join(sorted(READERS))}")
    return READERS[name](**kwargs)

