"""Look supervision: the answer position's attention over the image, taught by the teacher's own look.

A decoder answers "What colour is the ring?" by attending from the answer position to the ring's visual tokens and
reading their colour there. On short-answer VQA data the visual tokens hold the kinds and colours (a linear probe
finds them at each shape), yet the answers name another shape's colour about half the time when the image holds two:
the attention lands on the wrong shape (`benchmarks/answer_attention.py`). The next-token loss rewards the right look
only through the answer, one token at the end of four layers.

The "qa" teacher with the lookup head (`[align] teacher_head = "lookup"`, `vit_qa.LookupQAHead`) answers the same
questions by the same kind of lookup: the question's query attends over its patch features. Its attention map for a
question is where the answer is to be found. This loss asks the student's answer position, at one decoder layer
(`look_layer`, the attention averaged over its heads, restricted to the image's grid tokens), to look where the
teacher looks:

    labelled turn k of an isolated-turn row (`isolate_turns`): its question's tokens, decoded -> the teacher's
      vocabulary -> LookupQAHead.look(teacher features of the row's image) -> map (N,) over the teacher's grid
    the student's attention at layer L from the position that predicts the answer's first token, over the row's
      image grid tokens (softmax over them alone) -> (N,)
    loss = KL(teacher map || student attention), averaged over the turns

The teacher's map is resampled to the student's token grid where the two differ (a `teacher_patch_size` that is not
the model's pixels per token). Rows without an image are left out.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from monovlm.data.collate import Batch
from monovlm.data.processor import IGNORE_INDEX
from monovlm.model.vit import load_vit
from monovlm.train.vit_qa import load_qa_head

MAX_CACHED_QUESTIONS = 100_000
ROLE_LINES = {"user", "assistant", "system", "human", "gpt"}  # chat-template role names between the turns' texts


def labelled_turns(labels: torch.Tensor, turn_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, turn id, position of the turn's first labelled token) of each labelled turn (id > 0) of isolated-turn
    rows, in row and position order; labels and turn_ids (B, T). A turn's reply is one run of labelled tokens."""
    labelled = (labels != IGNORE_INDEX) & (turn_ids > 0)  # (B, T)
    continues = torch.zeros_like(labelled)
    continues[:, 1:] = labelled[:, :-1] & (turn_ids[:, 1:] == turn_ids[:, :-1])
    rows, positions = (labelled & ~continues).nonzero(as_tuple=True)
    return list(zip(rows.tolist(), turn_ids[rows, positions].tolist(), positions.tolist()))


def question_text(tokenizer, ids: list[int]) -> str:
    """The words of a turn's tokens before its answer: special tokens and role lines ("assistant") left out."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return " ".join(line for line in text.splitlines() if line.strip().lower() not in ROLE_LINES).strip()


class TeacherLook:
    """The teacher's attention maps for the questions of a training batch (module docstring)."""

    def __init__(self, teacher_dir: str | Path, tokenizer, device: torch.device | str = "cpu"):
        folder = Path(teacher_dir)
        self.vit = load_vit(folder).to(device).eval()
        self.head, self.vocabulary = load_qa_head(folder)
        if not hasattr(self.head, "look"):
            raise ValueError(f"the teacher in {folder} has a {type(self.head).__name__}, which has no attention map "
                             "to look with: look supervision needs [align] teacher_head = \"lookup\"")
        self.head.to(device).eval()
        self.tokenizer = tokenizer
        self.texts: dict[tuple[int, ...], str] = {}  # a question's tokens -> its words: data repeat their questions

    def question(self, ids: list[int]) -> str:
        key = tuple(ids)
        if key not in self.texts:
            if len(self.texts) >= MAX_CACHED_QUESTIONS:  # data of many distinct questions: start over
                self.texts.clear()
            self.texts[key] = question_text(self.tokenizer, ids)
        return self.texts[key]

    @torch.no_grad()
    def maps(self, batch: Batch, turns: list[tuple[int, int, int]], image_of_row: list[int]) -> list[torch.Tensor]:
        """The teacher's map for each turn's question over its row's image: (rows, cols) of the teacher's grid, which
        sums to 1. Images of one grid size are asked together."""
        grids = self.vit.features(batch.images)  # [(rows, cols, W)] one per image
        before = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
        questions = [self.question(batch.input_ids[row][(batch.turn_ids[row] == turn) & (before < position)].tolist())
                     for row, turn, position in turns]
        maps: list[torch.Tensor | None] = [None] * len(turns)
        for shape, chosen in _grouped(turns, lambda row: tuple(grids[image_of_row[row]].shape[:2])).items():
            features = torch.stack([grids[image_of_row[turns[i][0]]] for i in chosen]).flatten(1, 2)  # (n, N, W)
            ids, lengths = self.vocabulary.encode([questions[i] for i in chosen])
            looks = self.head.look(features.float(), ids.to(features.device), lengths)  # (n, N)
            for i, look in zip(chosen, looks):
                maps[i] = look.view(shape)
        return maps


def _grouped(turns: list[tuple[int, int, int]], key) -> dict:
    """Indices of `turns` grouped by key(row)."""
    groups: dict = {}
    for index, (row, _, _) in enumerate(turns):
        groups.setdefault(key(row), []).append(index)
    return groups


def on_grid(look: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A teacher map (r, c) on the student's token grid (rows·cols,), summing to 1: resampled when the grids differ
    (a teacher patch that is not the model's pixels per token)."""
    if look.shape != (rows, cols):
        look = F.interpolate(look[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
    look = look.flatten().clamp_min(0)
    return look / look.sum().clamp_min(1e-12)


def student_look(attention: nn.Module, captured: tuple, queries: torch.Tensor, rows: torch.Tensor,
                 grid_positions: torch.Tensor) -> torch.Tensor:
    """(n, N) log attention of each query position over its row's image grid tokens at one layer, averaged over the
    heads. `captured`: that layer's attention inputs (x (B, T, C), LayerInputs) from its forward; queries (n,) the
    positions, rows (n,) their rows; grid_positions (n, N) the positions of each row's grid tokens, row-major."""
    x, inputs = captured[0], captured[1]
    q, k, _ = attention.project_qkv(x, inputs.cos, inputs.sin, inputs.routing, inputs.hw)  # (B, H, T, D)
    heads, kv_heads = q.shape[1], k.shape[1]
    query = q[rows, :, queries].float()  # (n, H, D)
    keys = k[rows[:, None], :, grid_positions].float().repeat_interleave(heads // kv_heads, dim=2)  # (n, N, H, D)
    scores = torch.einsum("nhd,nmhd->nhm", query, keys) * attention.head_dim**-0.5  # (n, H, N)
    return scores.softmax(dim=-1).mean(dim=1).clamp_min(1e-8).log()  # (n, N)


def look_loss(student_log: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), averaged over the turns; both (n, N), the student's as log-probabilities."""
    teacher = teacher / teacher.sum(dim=-1, keepdim=True)
    return (teacher * (teacher.clamp_min(1e-8).log() - student_log)).sum(dim=-1).mean()


class LookSupervision:
    """The look loss of a training batch: `TeacherLook`'s maps against the student's attention at `layer`."""

    def __init__(self, teacher: TeacherLook, layer: int):
        self.teacher = teacher
        self.layer = layer

    def capture(self, model) -> "_Capture":
        """A context that records the look layer's attention inputs during the model's forward."""
        return _Capture(model.decoder.layers[self.layer].attn)

    def loss(self, model, batch: Batch, captured: tuple) -> torch.Tensor:
        """The batch's look loss, averaged over its labelled turns (a zero when none has an image)."""
        zero = captured[0].new_zeros(()).float()
        if batch.turn_ids is None or not batch.images:
            return zero
        layout = model.visual_layout(batch.input_ids, batch.images)
        image_of_row, grids = [], []
        for row in range(batch.input_ids.shape[0]):
            patches = layout.patch_mask[row].nonzero()[:, 0]  # (N,) this row's grid tokens
            if len(patches) == 0:
                image_of_row.append(-1)
                grids.append(None)
                continue
            image = int(layout.image_index[row, patches[0]])
            cols = layout.grids[image][1]
            order = (layout.grid_row[row, patches] * cols + layout.grid_col[row, patches]).argsort()
            image_of_row.append(image)
            grids.append(patches[order])
        turns = [turn for turn in labelled_turns(batch.labels, batch.turn_ids) if grids[turn[0]] is not None]
        if not turns:
            return zero
        teacher = self.teacher.maps(batch, turns, image_of_row)
        attention = model.decoder.layers[self.layer].attn
        total = zero
        for shape, chosen in _grouped(turns, lambda row: layout.grids[image_of_row[row]]).items():
            rows = torch.tensor([turns[i][0] for i in chosen], device=zero.device)
            queries = torch.tensor([turns[i][2] - 1 for i in chosen], device=zero.device)  # predicts the answer
            positions = torch.stack([grids[turns[i][0]] for i in chosen])  # (n, N) the images' grid tokens
            target = torch.stack([on_grid(teacher[i], *shape) for i in chosen]).to(zero.device)  # (n, N)
            total = total + look_loss(student_look(attention, captured, queries, rows, positions), target) * len(chosen)
        return total / len(turns)


class _Capture:
    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.args: tuple | None = None

    def __enter__(self) -> "_Capture":
        self.handle = self.attention.register_forward_pre_hook(self._record)
        return self

    def _record(self, _module, args) -> None:
        self.args = args

    def __exit__(self, *exc) -> None:
        self.handle.remove()
