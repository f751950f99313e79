"""Per-request inference methods beyond OpenAI's settings: visual token reduction and a decoding strategy.

A request selects them in the `"monovlm"` extension object of its body (OpenAI clients send it with
`extra_body={"monovlm": {...}}`; one namespaced field cannot collide with a field OpenAI adds later):

    "monovlm": {"reduction": "fastv", "keep": 0.5, "decoding": "vcd", "alpha": 1.0, "beta": 0.1}

- `reduction`: a name of `monovlm.infer.reduction.METHODS` (random, uniform, fastv, ...), with that method's
  default layers and options; `keep` (in (0, 1], only with a reduction) is the fraction of each image's patch tokens
  kept (default: `build_reduction`'s, 0.25).
- `decoding`: "vcd" (visual contrastive decoding against the image under diffusion noise) or "damro" (contrast
  against only the outlier visual tokens); `alpha` (in [0, 100]) and `beta` (in [0, 1], only with a decoding strategy)
  override the strategy's defaults (VCD: 1.0 / 0.1, DAMRO: 0.5 / 0.1).

Both act on the request's images, so a request without an image that asks for either is refused (400) rather than
silently answered without it. DAMRO ranks the visual tokens of the full prompt at a middle layer, which a reduction
before that layer removes, so the two are not combined (400). `monovlm.infer.decoding.DebiasCalibration` is not
offered: it restricts the first answer token to a closed label set (e.g. yes/no) given as token ids, which suits an
evaluation of yes/no questions, not an open chat answer.

Requests share a batch only when their methods are equal (`key`); one with "random" reduction runs alone, because
the method draws the patches of every image of the batch from one generator, so a row's picks would depend on which
other requests arrived with it. Everything here is checked from JSON alone except the fit to the model's depth
(`check_model`, e.g. fastv's layer 2 needs at least 3 layers), which the server checks before queueing (400).

`monovlm chat --reduce fastv --keep 0.5 --decoding vcd` applies the same methods to every question of a
conversation that has an image (a text-only conversation is answered plainly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from monovlm.infer.decoding import DAMRO, VCD, DecodingStrategy
from monovlm.infer.reduction import METHODS, Reduction, build_reduction
from monovlm.serve.limits import bad_request, shown_number
from monovlm.serve.limits import json_type as _kind

FIELD = "monovlm"  # the request body's extension object
DECODINGS: dict[str, type[DecodingStrategy]] = {"vcd": VCD, "damro": DAMRO}
_KEYS = ("reduction", "keep", "decoding", "alpha", "beta")
# (1 + alpha)·l(v) − alpha·l(v′): far beyond the papers' 0.5-3 the answer is the contrast alone, and near fp32's
# range the mix overflows to inf − inf = nan, which the sampler cannot draw from
MAX_ALPHA = 100.0


@dataclass(frozen=True)
class InferenceMethods:
    """A request's token reduction and decoding strategy (None: none). None for keep / alpha / beta: the method's
    default. Build fresh objects per generation: a Reduction records the trace of its last forward."""

    reduction: str | None = None
    keep: float | None = None
    decoding: str | None = None
    alpha: float | None = None
    beta: float | None = None

    def __post_init__(self) -> None:  # a programming error here, not a request's (parse_methods checks requests)
        if self.reduction is not None and self.reduction not in METHODS:
            raise ValueError(f"reduction={self.reduction!r} is not one of {sorted(METHODS)}")
        if self.decoding is not None and self.decoding not in DECODINGS:
            raise ValueError(f"decoding={self.decoding!r} is not one of {sorted(DECODINGS)}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ValueError(f"keep={self.keep} must be in (0, 1]: the share of each image's patch tokens kept")
        if self.keep is not None and self.reduction is None:
            raise ValueError("keep needs a reduction")
        if (self.alpha is not None or self.beta is not None) and self.decoding is None:
            raise ValueError("alpha and beta need a decoding strategy")
        if self.reduction is not None and self.decoding == "damro":
            raise ValueError("DAMRO cannot be combined with token reduction")

    def key(self) -> tuple | None:
        """Equal keys may share a batched generation; None: run alone (random reduction, see the module docstring)."""
        if self.reduction == "random":
            return None
        return (self.reduction, self.keep, self.decoding, self.alpha, self.beta)

    def build_reduction(self) -> Reduction | None:
        if self.reduction is None:
            return None
        return build_reduction(self.reduction, **({} if self.keep is None else {"keep": self.keep}))

    def build_strategy(self) -> DecodingStrategy | None:
        if self.decoding is None:
            return None
        settings = {name: value for name, value in (("alpha", self.alpha), ("beta", self.beta)) if value is not None}
        return DECODINGS[self.decoding](**settings)

    def prefill_inputs(self, images: list) -> dict | None:
        """What `token_steps` gives the prefill: the images and, with a reduction, a fresh Reduction (None without
        images: both methods act on images, and requests without one that ask for them are refused earlier)."""
        inputs: dict[str, Any] = {}
        if images:
            inputs["images"] = images
            reduction = self.build_reduction()
            if reduction is not None:
                inputs["reduction"] = reduction
        return inputs or None

    def check_model(self, num_layers: int) -> None:
        """MethodError naming the method when its default layers do not exist in a `num_layers`-layer decoder (e.g.
        fastv scores at layer 1 and drops before layer 2, so it needs 3 layers)."""
        for name, build in (("reduction", self.build_reduction), ("decoding", self.build_strategy)):
            made = build()
            try:
                if isinstance(made, Reduction):
                    made.method.hook_layers(num_layers)  # raises, naming the method and its layer
                elif isinstance(made, DAMRO):
                    made.resolve_layer(num_layers)
            except ValueError as error:
                raise MethodError(name, f"{name} {getattr(self, name)!r} does not fit this model: {error}") from error


class MethodError(ValueError):
    """A method that cannot run on the model; `name` is the setting ("reduction" or "decoding")."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def terminal_methods(reduce: str | None, keep: float | None, decoding: str | None) -> InferenceMethods:
    """`monovlm chat`'s --reduce / --keep / --decoding -> InferenceMethods, or ValueError naming the flag."""
    if reduce is not None and reduce not in METHODS:
        raise ValueError(f"--reduce {reduce!r} is not a token reduction method; choose one of: {', '.join(METHODS)}")
    if decoding is not None and decoding not in DECODINGS:
        raise ValueError(f"--decoding {decoding!r} is not offered; choose one of: {', '.join(DECODINGS)}")
    if keep is not None and reduce is None:
        raise ValueError("--keep is the share of image tokens a reduction keeps; it needs --reduce METHOD")
    if keep is not None and not (0 < keep <= 1 and math.isfinite(keep)):
        raise ValueError(f"--keep {keep} must be in (0, 1]: the share of each image's patch tokens kept")
    if reduce is not None and decoding == "damro":
        raise ValueError("--decoding damro ranks the visual tokens of the whole prompt, which --reduce removes; use "
                         "one of them, or --decoding vcd with --reduce")
    return InferenceMethods(reduce, keep, decoding)


def parse_methods(value: Any, num_images: int) -> InferenceMethods:
    """The request's `"monovlm"` object -> InferenceMethods, or RequestError (400) naming the field and the reason."""
    if value is None:
        return InferenceMethods()
    if not isinstance(value, dict):
        raise bad_request(f"{FIELD} must be an object such as {{\"reduction\": \"fastv\", \"keep\": 0.5, "
                          f"\"decoding\": \"vcd\"}}, not {_kind(value)}", FIELD)
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise bad_request(f"{FIELD} has unsupported field(s) {unknown}; it accepts: {', '.join(_KEYS)}",
                          f"{FIELD}.{unknown[0]}", code="unsupported_field")
    reduction = _choice(value, "reduction", METHODS)
    decoding = _choice(value, "decoding", DECODINGS)
    keep = _number(value, "keep", 0.0, 1.0, low_open=True)
    alpha = _number(value, "alpha", 0.0, MAX_ALPHA)
    beta = _number(value, "beta", 0.0, 1.0)
    if keep is not None and reduction is None:
        raise bad_request(f"{FIELD}.keep is the share of image tokens a reduction keeps; it needs {FIELD}.reduction",
                          f"{FIELD}.keep")
    for name, number in (("alpha", alpha), ("beta", beta)):
        if number is not None and decoding is None:
            raise bad_request(f"{FIELD}.{name} sets the decoding strategy's contrast; it needs {FIELD}.decoding",
                              f"{FIELD}.{name}")
    if reduction is not None and decoding == "damro":
        raise bad_request(f"{FIELD}.decoding='damro' ranks the visual tokens of the whole prompt, which "
                          f"{FIELD}.reduction removes; use one of them, or decoding 'vcd' with a reduction",
                          f"{FIELD}.decoding", code="unsupported_combination")
    for name, chosen in (("reduction", reduction), ("decoding", decoding)):
        if chosen is not None and num_images == 0:
            raise bad_request(f"{FIELD}.{name}={chosen!r} acts on the request's images, and it has none; send an "
                              "image_url part or leave it out", f"{FIELD}.{name}", code="needs_image")
    return InferenceMethods(reduction, keep, decoding, alpha, beta)


def _choice(value: dict, name: str, allowed) -> str | None:
    chosen = value.get(name)
    if chosen is None:
        return None
    if not isinstance(chosen, str) or chosen not in allowed:
        shown = repr(chosen) if isinstance(chosen, str) else _kind(chosen)
        raise bad_request(f"{FIELD}.{name}={shown} is not one of: {', '.join(sorted(allowed))}", f"{FIELD}.{name}",
                          code="unsupported_value")
    return chosen


def _number(value: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    number = value.get(name)
    if number is None:
        return None
    # an int is finite even when too large for a float (math.isfinite would raise OverflowError on it)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            not (isinstance(number, int) or math.isfinite(number)):
        raise bad_request(f"{FIELD}.{name} must be a finite number, not {_kind(number)}", f"{FIELD}.{name}")
    if number < low or (low_open and number == low) or number > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"{FIELD}.{name}={shown_number(number)} is outside {interval}", f"{FIELD}.{name}")
    return float(number)
