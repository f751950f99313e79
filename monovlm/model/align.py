"""EVE's patch-aligning layer (PAL): extra supervision from a frozen vision teacher, in training only.

EVE (`VisionCompressor` in baaivision/EVE) reads the decoder's hidden states at several depths over the image's grid
tokens, fuses them with a small attention across depths, and pulls the result towards a frozen vision encoder's patch
features with `1 − cos`. Nothing here is part of the inference model: the `PatchAligner` and the teachers
(`monovlm.model.teachers`) live outside `EncoderFreeVLM`, are never in its `state_dict`, and are never written into
its checkpoint folder — a trainer that wants to resume saves the aligner's state next to the model, not inside it.

    with HiddenCapture(model.decoder, depths) as capture:        # hooks only on the chosen layers
        ce = model.loss(input_ids, labels, images, attention_mask)
    vision_mask = input_ids == model.image_token_id
    layouts = [TokenLayout.for_image(image, vision) for image in images]
    align = alignment_loss(aligner, capture.states, vision_mask, layouts, teacher(images))
    (ce + align).backward()

Depths follow HF's `hidden_states` numbering (and EVE's `layer_idx`): depth 0 is the embedding output (the input of
`decoder.layers[0]`), depth d >= 1 is the output of `decoder.layers[d - 1]`, and a negative depth counts from the end
(-1 is the output of the last layer, -2 of the one before — the same as Python indexing of `decoder.layers`). Two
names are accepted as well: "embeddings" (= 0) and "final" (the output of the decoder's final RMSNorm, which is what
HF, and hence EVE, returns as the last hidden state; depth -1 is the same layer *before* that norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monovlm.data.layout import TokenLayout

ALIGN_LOSSES = ("cosine", "mse")
DEPTH_NAMES = ("embeddings", "final")

Depth = int | str


def eve_layers(num_layers: int, step: int = 4) -> list[int]:
    """EVE's depths for a decoder of `num_layers` layers, shallow to deep: every `step`-th depth counted back from the
    last one, down to 0 (EVE: `layer_idx = L − arange(0, L + 1, 4)`, i.e. [0, 4, ..., 32] for L = 32).

    Ordered shallow → deep because `PatchAligner` takes its query from the *last* captured entry (the deepest)."""
    if num_layers < 1 or step < 1:
        raise ValueError(f"num_layers={num_layers} and step={step} must be positive")
    return list(range(num_layers, -1, -step))[::-1]


# ---------------------------------------------------------------------------------------------------------------------
# Selecting the grid tokens


def grid_token_index(vision_mask: torch.Tensor | None, layouts: Sequence[TokenLayout]) -> list[torch.Tensor]:
    """Per image, the flat indices (into B·T) of its grid tokens in row-major order, CLS and row separators skipped.

    vision_mask (B, T) is True at every visual placeholder; images take the placeholders in row-major order of the
    batch, each laid out as its `TokenLayout` says (the scatter of `EncoderFreeVLM.embed`). Raises ValueError when
    the placeholder count disagrees with the layouts, or when an image's placeholders are not one contiguous run
    inside one row of the batch (the layouts are then in the wrong order or of the wrong sizes).
    """
    return span_token_index(vision_mask, layouts, [layout.patch_index for layout in layouts])


def query_token_index(vision_mask: torch.Tensor | None, layouts: Sequence[TokenLayout]) -> list[torch.Tensor]:
    """Per image, the flat indices (into B·T) of its learnable query tokens (BREEN), in order; as `grid_token_index`."""
    return span_token_index(vision_mask, layouts, [layout.query_index for layout in layouts])


def span_token_index(vision_mask: torch.Tensor | None, layouts: Sequence[TokenLayout],
                     local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per image, the flat indices (into B·T) of the tokens `local[i]` (positions inside image i's placeholder span)."""
    if vision_mask is None or not layouts:
        placeholders = 0 if vision_mask is None else int(vision_mask.sum())
        if placeholders or layouts:
            raise ValueError(f"the batch has {placeholders} visual placeholder(s) but {len(layouts)} image layout(s)")
        return []
    if vision_mask.dim() != 2:
        raise ValueError(f"vision_mask must be (B, T), got shape {tuple(vision_mask.shape)}")
    for layout in layouts:
        if layout.rows <= 0 or layout.cols <= 0:
            raise ValueError(f"grid ({layout.rows}, {layout.cols}) must have positive sides")
    device = vision_mask.device
    length = vision_mask.shape[1]
    grids = [(layout.rows, layout.cols) for layout in layouts]
    placeholders = vision_mask.reshape(-1).nonzero().squeeze(1)  # (N_visual,) flat positions, row-major
    counts = torch.tensor([layout.num_tokens for layout in layouts], device=device)  # (I,) placeholders per image
    if int(counts.sum()) != placeholders.numel():
        raise ValueError(f"the batch has {placeholders.numel()} visual placeholders but the layouts of the grids "
                         f"{grids} need {int(counts.sum())}")
    starts = torch.cumsum(counts, 0) - counts  # (I,) index of each image's first placeholder in `placeholders`
    first, last = placeholders[starts], placeholders[starts + counts - 1]
    broken = (last - first != counts - 1) | (first // length != last // length)
    if bool(broken.any()):
        image = int(broken.nonzero()[0])
        raise ValueError(
            f"image {image} (grid {grids[image]}) does not match one contiguous run of placeholders in one row; "
            "are the layouts in the order of the images' placeholders?"
        )
    per_image = torch.tensor([index.numel() for index in local], device=device)  # (I,)
    local_flat = torch.cat(list(local)).to(device)  # (G,) token within its image
    flat = placeholders[torch.repeat_interleave(starts, per_image) + local_flat]  # (G,)
    return list(flat.split(per_image.tolist()))


# ---------------------------------------------------------------------------------------------------------------------
# Capturing hidden states with hooks


class HiddenCapture:
    """Context manager: forward hooks on the chosen decoder depths that keep only those layers' outputs.

    `HiddenCapture(decoder, depths)` (a `Decoder`, or any model with a `.decoder`) — see the module docstring for the
    depth convention. Hooks are registered on entry and removed on exit, also when the block raises; the states of
    the last forward stay readable after exit through `.states` (in the order of `depths`, duplicates allowed).
    A forward inside the block replaces the states of the previous one. The captured tensors are the live outputs,
    with their autograd graph, so a loss on them trains the layers below them.

    With activation checkpointing use the non-reentrant form (`use_reentrant=False`): the reentrant one runs the
    forward under `no_grad`, and the captured states would carry no graph.
    """

    def __init__(self, decoder: nn.Module, depths: Sequence[Depth]):
        decoder = getattr(decoder, "decoder", decoder)
        if not hasattr(decoder, "layers"):
            raise TypeError(f"HiddenCapture needs a decoder with .layers, got {type(decoder).__name__}")
        if not depths:
            raise ValueError("HiddenCapture needs at least one depth")
        self.decoder = decoder
        self.num_layers = len(decoder.layers)
        self.depths = [self.resolve(depth, self.num_layers) for depth in depths]
        self._states: dict[int | str, torch.Tensor] = {}
        self._handles: list = []

    @staticmethod
    def resolve(depth: Depth, num_layers: int) -> int | str:
        """A depth as 0..num_layers, or "final"; raises ValueError outside the decoder."""
        if isinstance(depth, str):
            if depth not in DEPTH_NAMES:
                raise ValueError(f"depth {depth!r} is not a layer number or one of {DEPTH_NAMES}")
            return 0 if depth == "embeddings" else "final"
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth {depth!r} must be an int or one of {DEPTH_NAMES}")
        resolved = depth + num_layers + 1 if depth < 0 else depth
        if not 0 <= resolved <= num_layers:
            raise ValueError(f"depth {depth} is outside a decoder of {num_layers} layers "
                             f"(0 = embeddings .. {num_layers}, or -1 .. -{num_layers + 1})")
        return resolved

    def _keep(self, key: int | str):
        def hook(module, args, output=None):
            # a pre-hook (the embeddings) sees the layer's input, a forward hook its output
            self._states[key] = args[0] if output is None else output
        return hook

    def __enter__(self) -> "HiddenCapture":
        if self._handles:
            raise RuntimeError("this HiddenCapture is already active")
        self._states = {}
        try:
            for key in dict.fromkeys(self.depths):  # unique, in order
                if key == 0:
                    handle = self.decoder.layers[0].register_forward_pre_hook(self._keep(key))
                elif key == "final":
                    handle = self.decoder.norm.register_forward_hook(self._keep(key))
                else:
                    handle = self.decoder.layers[key - 1].register_forward_hook(self._keep(key))
                self._handles.append(handle)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def states(self) -> list[torch.Tensor]:
        """The captured (B, T, C) states, one per requested depth, in the order requested."""
        missing = [depth for depth in self.depths if depth not in self._states]
        if missing:
            raise RuntimeError(f"no hidden states captured for depth(s) {missing}; run the model's forward inside "
                               "the `with HiddenCapture(...)` block")
        return [self._states[depth] for depth in self.depths]

    def clear(self) -> None:
        self._states = {}


# ---------------------------------------------------------------------------------------------------------------------
# The aligning head


class PatchAligner(nn.Module):
    """EVE's PAL head: fuses a token's hidden states at several depths and predicts the teacher's patch feature.

    Per captured depth j: `LayerNorm(hidden) → Linear(hidden → teacher_dim, no bias)`. The projection of the last
    (deepest) entry is the query; the projections of the others are both keys and values (no separate K/V matrices),
    attended per token across depths with `heads` heads and scale `teacher_dim ** -0.5` (EVE's scale, not the usual
    head_dim ** -0.5). The prediction is `input_layer(h_last) + output_layer(fused)`. With `num_layers == 1` there is
    nothing to attend to and the prediction is `input_layer(h_last)` alone (no unused parameters are built).

    Training only: it is not part of `EncoderFreeVLM` and is never saved into the inference model.
    """

    def __init__(self, hidden_size: int, teacher_dim: int, num_layers: int, heads: int = 8, loss: str = "cosine",
                 weight: float = 1.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1 (the number of captured depths)")
        if loss not in ALIGN_LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {ALIGN_LOSSES}")
        if num_layers > 1 and teacher_dim % heads:
            raise ValueError(f"teacher_dim={teacher_dim} must be divisible by heads={heads}")
        self.hidden_size, self.teacher_dim, self.num_layers = hidden_size, teacher_dim, num_layers
        self.heads, self.loss, self.weight = heads, loss, weight
        self.scale = teacher_dim**-0.5
        if num_layers > 1:
            self.norm_layers = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, teacher_dim, bias=False))
                for _ in range(num_layers))
            self.output_layer = nn.Linear(teacher_dim, teacher_dim)
        else:
            self.norm_layers, self.output_layer = None, None
        self.input_layer = nn.Linear(hidden_size, teacher_dim)

    def predict(self, captured: Sequence[torch.Tensor]) -> torch.Tensor:
        """captured: num_layers tensors (N, hidden), shallow → deep -> predicted teacher features (N, teacher_dim)."""
        if len(captured) != self.num_layers:
            raise ValueError(f"PatchAligner was built for {self.num_layers} depth(s), got {len(captured)}")
        dtype = self.input_layer.weight.dtype
        captured = [h.to(dtype) for h in captured]
        h_last = captured[-1]  # (N, hidden)
        prediction = self.input_layer(h_last)  # (N, D)
        if self.norm_layers is None:
            return prediction
        tokens = h_last.shape[0]
        head_dim = self.teacher_dim // self.heads
        projected = [norm(h) for norm, h in zip(self.norm_layers, captured)]  # num_layers × (N, D)
        query = projected[-1].view(tokens, self.heads, head_dim)  # (N, heads, d)
        keys = torch.stack(projected[:-1], dim=1)  # (N, K, D): the other depths, keys and values at once
        keys = keys.view(tokens, self.num_layers - 1, self.heads, head_dim)  # (N, K, heads, d)
        weights = (torch.einsum("nhd,nkhd->nhk", query, keys) * self.scale).softmax(dim=-1)  # (N, heads, K)
        fused = torch.einsum("nhk,nkhd->nhd", weights, keys).reshape(tokens, self.teacher_dim)  # (N, D)
        return prediction + self.output_layer(fused)

    def forward(self, captured: Sequence[torch.Tensor], teacher: torch.Tensor,
                patches_per_image: Sequence[int] | None = None) -> torch.Tensor:
        """Scalar `weight · mean over images of (mean over the image's patches of 1 − cos)` (or of the MSE).

        captured: num_layers × (N, hidden) over the N grid tokens of the batch, images one after another;
        teacher: (N, teacher_dim) targets; patches_per_image: how the N tokens split into images (None: one image).
        """
        if teacher.dim() != 2 or teacher.shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher features must be (N, {self.teacher_dim}), got {tuple(teacher.shape)}")
        prediction = self.predict(captured)  # (N, D)
        if prediction.shape[0] != teacher.shape[0]:
            raise ValueError(f"{prediction.shape[0]} student tokens but {teacher.shape[0]} teacher features")
        if patches_per_image is None:
            patches_per_image = [prediction.shape[0]]
        if sum(patches_per_image) != prediction.shape[0]:
            raise ValueError(f"patches_per_image sums to {sum(patches_per_image)}, not to N={prediction.shape[0]}")
        if prediction.shape[0] == 0:
            return self.zero()
        prediction, target = prediction.float(), teacher.detach().float()
        if self.loss == "cosine":
            per_patch = 1.0 - F.cosine_similarity(prediction, target, dim=-1, eps=1e-8)  # (N,)
        else:
            per_patch = (prediction - target).pow(2).mean(dim=-1)  # (N,)
        per_image = torch.stack([chunk.mean() for chunk in per_patch.split(list(patches_per_image)) if chunk.numel()])
        return self.weight * per_image.mean()

    def zero(self) -> torch.Tensor:
        """A 0 connected to every parameter, so DDP sees them all used in a batch without images."""
        return sum(p.sum() * 0.0 for p in self.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Teacher grids and the whole loss


def resample_grid(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Teacher features (rows_t, cols_t, D) -> (rows, cols, D) on the student's grid, one axis at a time:
    adaptive average pooling along an axis where the teacher has more cells, bilinear interpolation
    (align_corners=False) where it has fewer, nothing where they agree. Both grids cover the whole image."""
    if features.dim() != 3:
        raise ValueError(f"teacher features must be (rows, cols, D), got shape {tuple(features.shape)}")
    rows_t, cols_t = features.shape[:2]
    if (rows_t, cols_t) == (rows, cols):
        return features
    maps = features.permute(2, 0, 1).unsqueeze(0)  # (1, D, rows_t, cols_t)
    pooled = (min(rows, rows_t), min(cols, cols_t))
    if pooled != (rows_t, cols_t):
        maps = F.adaptive_avg_pool2d(maps, pooled)
    if pooled != (rows, cols):
        # an axis that already has its size is left exactly as is by bilinear interpolation (scale 1)
        maps = F.interpolate(maps, size=(rows, cols), mode="bilinear", align_corners=False)
    return maps[0].permute(1, 2, 0)  # (rows, cols, D)


def float_targets(feats: torch.Tensor, teacher_dim: int) -> torch.Tensor:
    """One image's teacher features (rows, cols, D), checked, detached and in float32 whatever their storage dtype:
    float16 features (a precomputed file) inside a bf16 autocast region make torch.cat fail ("Unexpected floating
    ScalarType"), and the loss is float32 anyway."""
    if feats.dim() != 3 or feats.shape[-1] != teacher_dim:
        raise ValueError(f"teacher features must be (rows, cols, {teacher_dim}), got {tuple(feats.shape)}")
    return feats.detach().float()


def alignment_loss(
    aligner: PatchAligner,
    captured_states: Sequence[torch.Tensor],
    vision_mask: torch.Tensor | None,
    layouts: Sequence[TokenLayout],
    teacher_feats: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The PAL loss of a batch: grid tokens of every image at every captured depth vs. the teacher's features.

    captured_states: (B, T, C) per depth, shallow → deep (`HiddenCapture.states`); vision_mask (B, T) (None for a
    text-only batch); layouts: the `TokenLayout` of each image in placeholder order; teacher_feats: (rows_t, cols_t, D) per image, resampled to (rows, cols) with
    `resample_grid`. A batch without images gives a 0 that is still connected to the aligner's parameters (text-only
    samples contribute nothing, as in EVE).
    """
    if len(teacher_feats) != len(layouts):
        raise ValueError(f"{len(layouts)} image(s) but {len(teacher_feats)} teacher feature map(s)")
    index = grid_token_index(vision_mask, layouts)
    if not index:
        return aligner.zero()
    flat_index = torch.cat(index)  # (N,)
    captured = [states.reshape(-1, states.shape[-1])[flat_index] for states in captured_states]  # × (N, C)
    targets = []
    for feats, layout in zip(teacher_feats, layouts):
        feats = float_targets(feats, aligner.teacher_dim)
        targets.append(resample_grid(feats, layout.rows, layout.cols).reshape(layout.rows * layout.cols, -1))
    teacher = torch.cat(targets).to(flat_index.device)  # (N, D)
    return aligner(captured, teacher, [layout.rows * layout.cols for layout in layouts])


def query_alignment_loss(
    aligner: PatchAligner,
    captured_states: Sequence[torch.Tensor],
    vision_mask: torch.Tensor | None,
    layouts: Sequence[TokenLayout],
    teacher_feats: Sequence[torch.Tensor],
    query_grids: Sequence[int],
) -> torch.Tensor:
    """BREEN's align loss: each image's learnable query tokens vs. its teacher features pooled to each query grid.

    The queries of grid side s (taken in `query_grids` order, s² of them, row-major) predict the teacher's
    (rows_t, cols_t, D) features average-pooled to s × s (`resample_grid`): [1] is the whole image's mean feature,
    [1, 2, 4] three granularities. Arguments as `alignment_loss`; every layout must have sum(s²) queries."""
    if len(teacher_feats) != len(layouts):
        raise ValueError(f"{len(layouts)} image(s) but {len(teacher_feats)} teacher feature map(s)")
    expected = sum(side * side for side in query_grids)
    if any(layout.num_queries != expected for layout in layouts):
        raise ValueError(f"query_grids {list(query_grids)} need {expected} queries per image, the layouts have "
                         f"{sorted({layout.num_queries for layout in layouts})}")
    index = query_token_index(vision_mask, layouts)
    if not index or expected == 0:
        return aligner.zero()
    flat_index = torch.cat(index)  # (I·K,)
    captured = [states.reshape(-1, states.shape[-1])[flat_index] for states in captured_states]  # × (I·K, C)
    targets = []
    for feats in teacher_feats:
        feats = float_targets(feats, aligner.teacher_dim)
        targets += [resample_grid(feats, side, side).reshape(side * side, -1) for side in query_grids]
    teacher = torch.cat(targets).to(flat_index.device)  # (I·K, D)
    return aligner(captured, teacher, [expected] * len(layouts))


def target_alignment_loss(target: str, aligner: PatchAligner, captured_states: Sequence[torch.Tensor],
                          vision_mask: torch.Tensor | None, layouts: Sequence[TokenLayout],
                          teacher_feats: Sequence[torch.Tensor], query_grids: Sequence[int] = ()) -> torch.Tensor:
    """The align loss a recipe's `[align] target` names: "patches" (`alignment_loss`) or "queries"
    (`query_alignment_loss` over `query_grids`)."""
    if target == "queries":
        return query_alignment_loss(aligner, captured_states, vision_mask, layouts, teacher_feats, query_grids)
    if target != "patches":
        raise ValueError(f"align target {target!r} is not 'patches' or 'queries'")
    return alignment_loss(aligner, captured_states, vision_mask, layouts, teacher_feats)


def text_distillation_loss(states: torch.Tensor, embeddings: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """HoVLE's text distillation: mean over text tokens of 1 − cos(state, the token's own input embedding).

    states (B, T, C) after the holistic embedding (the pre-buffer's last layer); embeddings (B, T, C) the LLM's
    embeddings of the same tokens (the target, detached); text_mask (B, T) True at real text tokens. A batch without
    text gives a 0 connected to `states`."""
    if not bool(text_mask.any()):
        return states.sum() * 0.0
    student, target = states[text_mask].float(), embeddings[text_mask].detach().float()  # (N, C)
    return (1.0 - F.cosine_similarity(student, target, dim=-1, eps=1e-8)).mean()
