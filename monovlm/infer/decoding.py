"""Decoding strategies against object hallucination: they change each step's next-token logits before the sampler.

Three training-free methods, each composable with any sampler (greedy, temperature, top-k, top-p, seeds), because
`generate` applies the sampler to whatever logits the strategy returns:

- `VCD` (visual contrastive decoding, Leng et al. CVPR 2024): `(1+α)·l(v) − α·l(v′)` with v′ the image under
  diffusion noise, and tokens below β times the most likely token's probability (under l(v)) cut off.
- `DebiasCalibration` (post-hoc debias of "Debiasing Multimodal Large Language Models", Zhang et al. 2024): on a
  closed answer set (yes/no), the first step's label distribution is divided by the label prior of a meaningless
  visual input (no image, blank, `<unk>` placeholders): `q(y) ∝ p(y|v,x) / p_cf(y)`.
- `DAMRO` (Gong et al. EMNLP 2024), adapted to encoder-free models: find the few "outlier" visual tokens that draw
  anomalously high attention, and contrast against a forward that sees only those tokens of the image.

`ContrastiveDecoding(source)` is the shared VCD formula with any contrast input from this module (`NoisedImage`,
`NoImage`, `BlankImage`, `UnkImage`); with `NoImage` it is the "visual debias decoding" of the debiasing paper.

`generate` drives a strategy through the protocol of `monovlm.infer.strategy`. Every auxiliary forward keeps its own KV cache and is fed exactly the tokens the main one is fed (finished rows'
pad tokens included), so batches with left padding behave like one-by-one runs. Logits a strategy changes come
back in fp32.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monovlm.data.layout import TokenLayout
from monovlm.infer.generate import left_pad, prefill
from monovlm.infer.strategy import DecodingStrategy, StrategyRun
from monovlm.model.experts import Routing

# ---------------------------------------------------------------------------------------------------------------------
# the mixing rule shared by VCD, visual debias decoding and DAMRO


def plausible_tokens(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """logits (B, V) -> bool (B, V): VCD's adaptive plausibility constraint, p(y) >= beta · max_w p(w).

    Compared in logit space (VCD's "version 2": l(y) >= log beta + max l), which is the same set because softmax
    shares one normaliser per row. beta = 0 keeps every token; beta = 1 keeps only the argmax (and its ties)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if beta == 0:
        return torch.ones_like(logits, dtype=torch.bool)
    return logits >= math.log(beta) + logits.max(dim=-1, keepdim=True).values


def contrast(main: torch.Tensor, aux: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1 + alpha)·main − alpha·aux over the plausible tokens of `main` (the unmixed logits), −inf elsewhere. (B, V)"""
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    main, aux = main.float(), aux.float()
    mixed = (1 + alpha) * main - alpha * aux
    return mixed.masked_fill(~plausible_tokens(main, beta), float("-inf"))


# ---------------------------------------------------------------------------------------------------------------------
# auxiliary branches: a degraded copy of the prompt, with its own KV cache


@dataclass
class BranchInputs:
    """The prompt of an auxiliary forward: (B, T') ids and mask, optional explicit positions, extra prefill inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    prefill_inputs: dict = field(default_factory=dict)


def _forward_kwargs(inputs: BranchInputs) -> dict:
    kwargs = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, **inputs.prefill_inputs}
    if inputs.position_ids is not None:
        kwargs["position_ids"] = inputs.position_ids
    return kwargs


class Branch:
    """One auxiliary forward with its own KV cache. `logits` (B, V) always predicts the same step as the main one."""

    def __init__(self, model, inputs: BranchInputs, max_new_tokens: int):
        length = inputs.input_ids.shape[1]
        extra = dict(inputs.prefill_inputs)
        if inputs.position_ids is not None:
            extra["position_ids"] = inputs.position_ids
        self.logits, self.step, self.cache = prefill(model, inputs.input_ids, inputs.attention_mask,
                                                     length + max_new_tokens, extra)  # logits (B, V)

    def feed(self, tokens: torch.Tensor) -> None:
        """tokens (B,): the tokens the main forward was just fed."""
        self.logits = self.step(tokens)


def _images_of(prefill_inputs: dict | None) -> list[torch.Tensor]:
    return list((prefill_inputs or {}).get("images") or [])


def _special_id(model, name: str) -> int:
    decoder = getattr(model, "decoder", None)
    ids = getattr(getattr(decoder, "config", None), "special_tokens", {}) or {}
    if name not in ids:
        raise ValueError(f"this contrast input needs a VLM whose decoder config records the {name!r} special token")
    return ids[name]


def diffusion_keep_scale(noise_step: int, num_steps: int = 1000) -> tuple[float, float]:
    """(sqrt(alpha_bar_T), sqrt(1 − alpha_bar_T)) of VCD's schedule: betas = sigmoid(linspace(−6, 6, 1000)) scaled into
    [1e-5, 5e-3], alpha_bar = cumprod(1 − beta), indexed at T = noise_step (computed in fp32 as VCD does)."""
    if not 0 <= noise_step < num_steps:
        raise ValueError(f"noise_step={noise_step} must be in [0, {num_steps})")
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)[noise_step]
    return float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())


def _content_seed(seed: int, image: torch.Tensor) -> int:
    # the noise of an image depends on (seed, its pixels) only, so a batch and one-by-one runs noise it identically
    data = image.detach().float().cpu().contiguous().numpy().tobytes()
    return (seed * 1_000_003 + zlib.crc32(data)) % (2**63)


def add_diffusion_noise(image: torch.Tensor, noise_step: int = 500, seed: int = 0) -> torch.Tensor:
    """VCD's distortion of one preprocessed (normalised) pixel tensor (3, H, W): sqrt(ᾱ_T)·v + sqrt(1 − ᾱ_T)·ε."""
    keep, scale = diffusion_keep_scale(noise_step)
    generator = torch.Generator().manual_seed(_content_seed(seed, image))
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float32).to(image.device, image.dtype)
    return keep * image + scale * noise


class ContrastInput:
    """How an auxiliary prompt is made from the main one (the visual counterfactual)."""

    def build(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              prefill_inputs: dict | None) -> BranchInputs:
        raise NotImplementedError


@dataclass
class NoisedImage(ContrastInput):
    """VCD: every image under diffusion noise at step `noise_step` (0-999); `seed` seeds the noise."""

    noise_step: int = 500
    seed: int = 0

    def build(self, model, input_ids, attention_mask, prefill_inputs):
        images = _images_of(prefill_inputs)
        if not images:
            raise ValueError("NoisedImage needs the prompt's images in prefill_inputs['images']")
        noised = [add_diffusion_noise(image, self.noise_step, self.seed) for image in images]
        return BranchInputs(input_ids, attention_mask, None, {**prefill_inputs, "images": noised})


@dataclass
class BlankImage(ContrastInput):
    """Every image replaced by zeros in normalised pixel space, i.e. a flat image of the normalisation mean colour
    (the debiasing paper's "zero" input)."""

    def build(self, model, input_ids, attention_mask, prefill_inputs):
        images = _images_of(prefill_inputs)
        if not images:
            raise ValueError("BlankImage needs the prompt's images in prefill_inputs['images']")
        return BranchInputs(input_ids, attention_mask, None,
                            {**prefill_inputs, "images": [torch.zeros_like(image) for image in images]})


@dataclass
class NoImage(ContrastInput):
    """The prompt without its images: image start/end markers and placeholders removed, rows re-padded on the left
    (so the positions of the remaining text are recomputed, as for a prompt written without an image)."""

    def build(self, model, input_ids, attention_mask, prefill_inputs):
        drop = torch.tensor([_special_id(model, name) for name in ("image", "image_start", "image_end")],
                            device=input_ids.device)
        rows = []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row] != 0]
            ids = ids[~torch.isin(ids, drop)]
            if ids.numel() == 0:
                raise ValueError(f"prompt row {row} has no text besides its image: NoImage would leave it empty")
            rows.append(ids.tolist())
        ids, mask = left_pad(rows)
        extra = {k: v for k, v in (prefill_inputs or {}).items() if k not in ("images", "position_ids")}
        return BranchInputs(ids.to(input_ids.device), mask.to(input_ids.device), None, extra)


@dataclass
class UnkImage(ContrastInput):
    """Every image placeholder replaced by the text token `token_id` (the paper's `<unk>` input; 0 = the pad/unk row
    of most vocabularies), and no image given: the image's span keeps its length and positions but carries no pixels."""

    token_id: int = 0

    def build(self, model, input_ids, attention_mask, prefill_inputs):
        image_id = _special_id(model, "image")
        ids = input_ids.masked_fill(input_ids == image_id, self.token_id)
        extra = {k: v for k, v in (prefill_inputs or {}).items() if k != "images"}
        positions = extra.pop("position_ids", None)
        if positions is None and model.decoder.config.visual_position_step != 1:  # V2PE: the image's own positions
            segment_ids = None if attention_mask is None else attention_mask.long()
            positions = model.decoder.default_positions(segment_ids, input_ids.shape, None, input_ids.device,
                                                        input_ids == image_id)
        return BranchInputs(ids, attention_mask, positions, extra)


# ---------------------------------------------------------------------------------------------------------------------
# strategies


class _ContrastRun(StrategyRun):
    def __init__(self, branch: Branch, alpha: float, beta: float):
        self.branch, self.alpha, self.beta = branch, alpha, beta

    def process(self, logits, fed_tokens=None):
        if fed_tokens is not None:
            self.branch.feed(fed_tokens)
        return contrast(logits, self.branch.logits, self.alpha, self.beta)


@dataclass
class ContrastiveDecoding(DecodingStrategy):
    """`(1+alpha)·l(v) − alpha·l(v′)` with the plausibility cut-off `beta`, v′ built by `source`.

    With `NoImage()` (alpha=1, beta=0.2 in the paper's scripts) this is the debiasing paper's visual debias decoding."""

    source: ContrastInput
    alpha: float = 1.0
    beta: float = 0.1

    def __post_init__(self) -> None:
        _check_alpha_beta(self.alpha, self.beta)

    def start(self, model, input_ids, attention_mask, prefill_inputs, max_new_tokens):
        inputs = self.source.build(model, input_ids, attention_mask, prefill_inputs)
        return _ContrastRun(Branch(model, inputs, max_new_tokens), self.alpha, self.beta)


class VCD(ContrastiveDecoding):
    """Visual contrastive decoding: the contrast image is the prompt's image under diffusion noise.

    Defaults are the VCD LLaVA script's argparse defaults (alpha=1, beta=0.1, noise_step=500); its POPE script uses
    beta=0.2. VCD samples (temperature 1): compare it against the same sampler without contrast, over several seeds."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0):
        super().__init__(NoisedImage(noise_step, seed), alpha, beta)


def _check_alpha_beta(alpha: float, beta: float) -> None:
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")


# ---------------------------------------------------------------------------------------------------------------------
# post-hoc debias calibration on a closed answer set


def label_token_ids(tokenizer, labels: Sequence[str] = ("yes", "no")) -> dict[str, list[int]]:
    """Every vocabulary token that decodes, lowercased and stripped, to one of `labels` (the paper's key rule:
    "Yes", " yes" and "yes" all count for yes). Raises if a label has no single-token form."""
    wanted = {label.strip().lower(): label for label in labels}
    ids: dict[str, list[int]] = {label: [] for label in labels}
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id]).strip().lower()
        if text in wanted:
            ids[wanted[text]].append(token_id)
    missing = [label for label, found in ids.items() if not found]
    if missing:
        raise ValueError(f"no vocabulary token decodes to the label(s) {missing}; pick labels that are single tokens")
    return ids


def label_log_probs(logits: torch.Tensor, label_ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """logits (B, V) -> log of each label's summed token probability (B, Y) (not renormalised over the labels)."""
    log_probs = logits.float().log_softmax(dim=-1)
    return torch.stack([log_probs[:, ids].logsumexp(dim=-1) for ids in label_ids], dim=-1)


def calibrate(label_log_p: torch.Tensor, prior_log_ps: Sequence[torch.Tensor], epsilon: float = 1e-4) -> torch.Tensor:
    """The paper's `diagonal_W` calibration (`eval_pope_calibrate.py`, individual mode), in log space.

    p = normalise(p(y|v,x)); p_cf = normalise(sum over prior inputs of p_s(y)) + epsilon; q = normalise(p / p_cf).
    label_log_p (B, Y), prior_log_ps: one (B, Y) per prior input -> log q (B, Y)."""
    if not prior_log_ps:
        raise ValueError("calibration needs at least one prior input")
    prior = torch.stack(list(prior_log_ps)).logsumexp(dim=0)  # log of the summed label probabilities (B, Y)
    prior = prior.log_softmax(dim=-1).exp() + epsilon  # normalised, then + epsilon as in the paper
    return (label_log_p.log_softmax(dim=-1) - prior.log()).log_softmax(dim=-1)


class _DebiasRun(StrategyRun):
    def __init__(self, strategy: DebiasCalibration, label_ids: list[torch.Tensor], prior_log_ps: list[torch.Tensor]):
        self.strategy, self.label_ids, self.prior_log_ps = strategy, label_ids, prior_log_ps

    def process(self, logits, fed_tokens=None):
        if fed_tokens is not None:
            return logits  # only the answer's first token is calibrated
        log_q = calibrate(label_log_probs(logits, self.label_ids), self.prior_log_ps, self.strategy.epsilon)
        return calibrated_logits(logits, self.label_ids, log_q, self.strategy.restrict)


def calibrated_logits(logits: torch.Tensor, label_ids: Sequence[torch.Tensor], log_q: torch.Tensor,
                      restrict: bool) -> torch.Tensor:
    """Put each label's calibrated probability on its most likely token (its other forms get −inf), so that greedy
    decoding picks argmax_y q(y) and sampling picks label y with probability q(y) (at temperature 1).

    restrict=True: every other token gets −inf (the paper predicts argmax over the labels).
    restrict=False: other tokens keep their log-probabilities; the labels' total mass is redistributed by q."""
    log_probs = logits.float().log_softmax(dim=-1)  # (B, V)
    all_ids = torch.cat(list(label_ids))
    label_mass = log_probs[:, all_ids].logsumexp(dim=-1, keepdim=True)  # (B, 1)
    out = torch.full_like(log_probs, float("-inf")) if restrict else log_probs.index_fill(1, all_ids, float("-inf"))
    offset = 0.0 if restrict else label_mass
    for y, ids in enumerate(label_ids):
        best = ids[log_probs[:, ids].argmax(dim=-1)]  # (B,) the label's most likely surface form in each row
        out.scatter_(1, best[:, None], log_q[:, y : y + 1] + offset)
    return out


@dataclass
class DebiasCalibration(DecodingStrategy):
    """Post-hoc debias on a closed answer set: the first answer token is chosen by q(y) ∝ p(y|v,x) / p_cf(y).

    labels: label -> token ids (e.g. `label_token_ids(tokenizer, ("yes", "no"))`); prior: the meaningless inputs
    whose label probabilities are summed into p_cf (the paper's "none", "unk", "none+unk": `NoImage()`,
    `UnkImage()`, both). One extra prefill per prior input; later steps are not changed."""

    labels: Mapping[str, Sequence[int]]
    prior: Sequence[ContrastInput] = (NoImage(),)
    epsilon: float = 1e-4
    restrict: bool = True

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or any(len(ids) == 0 for ids in self.labels.values()):
            raise ValueError("labels must map at least two answers to non-empty lists of token ids")
        if not self.prior:
            raise ValueError("prior must name at least one meaningless input")

    def start(self, model, input_ids, attention_mask, prefill_inputs, max_new_tokens):
        label_ids = [torch.as_tensor(list(ids), dtype=torch.long, device=input_ids.device)
                     for ids in self.labels.values()]
        prior_log_ps = []
        for source in self.prior:
            inputs = source.build(model, input_ids, attention_mask, prefill_inputs)
            logits = model(**_forward_kwargs(inputs), last_only=True)[:, -1]  # one step only: no cache needed
            prior_log_ps.append(label_log_probs(logits, label_ids))
        return _DebiasRun(self, label_ids, prior_log_ps)


# ---------------------------------------------------------------------------------------------------------------------
# DAMRO, encoder-free
#
# DAMRO ranks ViT patches by the [CLS] token's attention and contrasts against a forward fed only the top-k patches.
# An encoder-free model has no ViT; the analogue here reads the decoder itself. At one decoder layer (the middle one
# by default) the last prompt token's attention over the image, averaged over heads, ranks the visual tokens, and
# the top k are the "outliers". Why the last prompt token and not the visual tokens' attention to each other: it is
# the query that produces the answer, DAMRO's own finding is that the decoder's attention from answer tokens
# concentrates on those outliers, it is one query row per sequence, and in a causal decoder the attention a visual
# token receives from other visual tokens is biased by position (token j is seen only by the tokens after it).
#
# Cost: the layer's input is captured from the main prefill with a one-shot forward pre-hook (no layer runs twice);
# only the last row's query and the prompt's keys are recomputed from that layer's input norm, q/k projections and
# RoPE, and one attention row per sequence is formed, never the full T×T matrix.
#
# The contrast branch is the same prompt with every visual token other than the outliers masked out (padding
# segment): the kept tokens keep their positions and their embedding (computed from the whole image, as DAMRO's
# kept ViT features are), CLS and row separators are masked too, and the text is unchanged.


def last_token_attention(decoder, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                         key_mask: torch.Tensor, vision_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention probabilities of each row's last token over all keys at one layer, averaged over heads.

    hidden (B, T, C): that layer's input; position_ids (B, T); key_mask (B, T) True where the last token may attend;
    vision_mask (B, T) True at visual tokens (they take the vision experts where the model has them). -> (B, T)."""
    block = decoder.layers[layer_index]
    routing = Routing.from_mask(vision_mask) if decoder.config.has_experts else None
    normed = block.attention_input(hidden, routing)  # (B, T, C)
    cos, sin = decoder.rotary(position_ids, hidden.dtype)  # (B, 1, T, D)
    q, k, _ = block.attn.project_qkv(normed, cos, sin, routing)  # (B, H, T, D), (B, Hkv, T, D)
    probs = block.attn.probabilities(q[:, :, -1:], k, key_mask[:, None, None, :])  # (B, H, 1, T)
    return probs[:, :, 0].mean(dim=1)  # (B, T)


def select_outliers(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, T), candidates (B, T) bool -> bool (B, T) marking each row's k highest-scoring candidates (fewer
    when a row has fewer than k candidates)."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    top = masked.topk(min(k, scores.shape[1]), dim=-1)
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, top.indices, torch.isfinite(top.values))
    return chosen & candidates


def grid_token_flags(images: Sequence[torch.Tensor], vision) -> torch.Tensor:
    """(N_visual,) bool over the visual tokens of `images` in order: True at grid (patch) tokens, False at CLS and
    row separators (`TokenLayout`)."""
    if not images:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([TokenLayout.for_image(image, vision).is_patch.cpu() for image in images])


class _LayerInputCapture:
    """A one-shot forward pre-hook that keeps a block's input (its first argument) and removes itself."""

    def __init__(self, block: torch.nn.Module):
        self.hidden: torch.Tensor | None = None
        self.handle = block.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.hidden = args[0] if args else kwargs["x"]
        self.handle.remove()

    def take(self) -> torch.Tensor:
        self.handle.remove()
        if self.hidden is None:
            raise RuntimeError("DAMRO saw no main prefill through its layer; call run.process right after it")
        hidden, self.hidden = self.hidden, None
        return hidden


class _DAMRORun(StrategyRun):
    def __init__(self, strategy: DAMRO, model, inputs: BranchInputs, layer: int, vision_mask: torch.Tensor,
                 candidates: torch.Tensor, max_new_tokens: int):
        self.strategy, self.model, self.inputs, self.layer = strategy, model, inputs, layer
        self.vision_mask, self.candidates, self.max_new_tokens = vision_mask, candidates, max_new_tokens
        self.capture = _LayerInputCapture(model.decoder.layers[layer])
        self.branch: Branch | None = None
        self.scores: torch.Tensor | None = None  # (B, T) the last token's attention, set after the main prefill
        self.outliers: torch.Tensor | None = None  # (B, T) bool, the visual tokens the contrast branch keeps

    def process(self, logits, fed_tokens=None):
        if self.branch is None:  # right after the main prefill: rank, then run the contrast prefill
            self.outliers = self._find_outliers(self.capture.take())
            self.branch = Branch(self.model, self._contrast_inputs(), self.max_new_tokens)
        elif fed_tokens is not None:
            self.branch.feed(fed_tokens)
        return contrast(logits, self.branch.logits, self.strategy.alpha, self.strategy.beta)

    def _find_outliers(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        if hidden.shape[:2] != inputs.input_ids.shape:
            raise ValueError(f"DAMRO's layer {self.layer} saw {tuple(hidden.shape[:2])} tokens for a prompt of "
                             f"{tuple(inputs.input_ids.shape)}: it needs the whole prompt at that layer (no visual "
                             f"token reduction before it)")
        key_mask = inputs.attention_mask != 0 if inputs.attention_mask is not None else torch.ones_like(self.vision_mask)
        window = self.model.decoder.config.sliding_window
        if window is not None:  # slots the last query cannot reach in a sliding-window model
            slots = torch.arange(key_mask.shape[1], device=key_mask.device)
            key_mask = key_mask & (slots > key_mask.shape[1] - 1 - window)
        scores = last_token_attention(self.model.decoder, self.layer, hidden, inputs.position_ids, key_mask,
                                      self.vision_mask)
        self.scores = scores
        return select_outliers(scores, self.candidates & key_mask, self.strategy.k)

    def _contrast_inputs(self) -> BranchInputs:
        inputs = self.inputs
        mask = inputs.attention_mask if inputs.attention_mask is not None else torch.ones_like(inputs.input_ids)
        keep = mask.masked_fill(self.vision_mask & ~self.outliers, 0)  # segment 0 = never attended, now or later
        return BranchInputs(inputs.input_ids, keep, inputs.position_ids, inputs.prefill_inputs)


@dataclass
class DAMRO(DecodingStrategy):
    """Contrast against a forward that sees only the k outlier visual tokens (see the comment above for the
    encoder-free adaptation). Defaults: DAMRO's POPE setting (alpha=0.5, beta=0.1, k=4); layer None = the middle
    decoder layer; candidates "grid" ranks patch tokens only (CLS and row separators excluded, as DAMRO ranks patches
    and not the CLS), "all" ranks every visual token."""

    alpha: float = 0.5
    beta: float = 0.1
    k: int = 4
    layer: int | None = None
    candidates: str = "grid"

    def __post_init__(self) -> None:
        _check_alpha_beta(self.alpha, self.beta)
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        if self.candidates not in ("grid", "all"):
            raise ValueError(f"candidates={self.candidates!r} must be 'grid' or 'all'")

    def resolve_layer(self, num_layers: int) -> int:
        layer = num_layers // 2 if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer={self.layer} is outside the decoder's {num_layers} layers")
        return layer

    def start(self, model, input_ids, attention_mask, prefill_inputs, max_new_tokens):
        if not hasattr(model, "image_token_id") or not hasattr(model, "decoder"):
            raise ValueError("DAMRO needs a VLM (a model with an image_token_id and a decoder)")
        if model.decoder.config.native_rope:
            raise ValueError("DAMRO does not support native_rope models yet (it re-runs one layer's attention with "
                             "1-D positions only)")
        prefill_inputs = dict(prefill_inputs or {})
        vision_mask = input_ids == model.image_token_id  # (B, T)
        images = _images_of(prefill_inputs)
        candidates = vision_mask.clone()
        if self.candidates == "grid" and images:
            flags = grid_token_flags(images, model.config.vision).to(input_ids.device)
            if flags.numel() != int(vision_mask.sum()):
                raise ValueError(f"the prompt has {int(vision_mask.sum())} image placeholders but its images have "
                                 f"{flags.numel()} visual tokens; build the prompt with this model's processor")
            candidates = candidates.masked_scatter(vision_mask, flags)
        position_ids = prefill_inputs.pop("position_ids", None)
        if position_ids is None:  # the positions the main prefill uses (left padding: count real tokens only)
            segment_ids = None if attention_mask is None else attention_mask.long()
            position_ids = model.decoder.default_positions(segment_ids, input_ids.shape, None, input_ids.device,
                                                           vision_mask)
        inputs = BranchInputs(input_ids, attention_mask, position_ids, prefill_inputs)
        layer = self.resolve_layer(len(model.decoder.layers))
        return _DAMRORun(self, model, inputs, layer, vision_mask, candidates, max_new_tokens)


__all__ = [
    "DAMRO", "VCD", "BlankImage", "Branch", "BranchInputs", "ContrastInput", "ContrastiveDecoding",
    "DebiasCalibration", "DecodingStrategy", "NoImage", "NoisedImage", "StrategyRun", "UnkImage",
    "add_diffusion_noise", "calibrate", "calibrated_logits", "contrast", "diffusion_keep_scale", "grid_token_flags",
    "label_log_probs", "label_token_ids", "last_token_attention", "plausible_tokens", "select_outliers",
]
