"""An OpenAI chat-completions request body -> validated turns, image bytes and generation options.

Only JSON is checked here (no model, no pixels): every field is validated with a message that names it, and anything
the server would otherwise silently ignore is refused, so a client never believes a setting was applied when it was
not. What is accepted:

- `messages`: `system` (or `developer`; it replaces the model's configured system prompt), `user` and `assistant`
  turns; `content` is a string or a list of parts `{"type": "text", "text": ...}` and, in user turns,
  `{"type": "image_url", "image_url": {"url": "data:..."}}`.
  Images must be inline data URIs (base64): the server never fetches a URL. The last turn must be the user's.
- `temperature` (default 0: greedy, unlike OpenAI's 1 — a small model answers best greedily, and answers repeat),
  `top_p`, `top_k`, `max_tokens` (or `max_completion_tokens`), `stop`, `seed`, `stream`,
  `stream_options.include_usage`, `model`, `n` (only 1), `user` (informational), and OpenAI's neutral defaults of
  settings we do not implement (`frequency_penalty: 0`, `presence_penalty: 0`, `logprobs: false`).
- `monovlm`: this server's extension object, `{"reduction": "fastv", "keep": 0.5, "decoding": "vcd", "alpha": 1,
  "beta": 0.1}` (every key optional): visual token reduction and a decoding strategy for this request; see
  `methods.py` for the names, defaults and rules (both need an image; DAMRO does not combine with a reduction).

A message's parts are read in order: each image part becomes one image marker (the processor puts that image's
tokens there) and a line break separates an image from text beside it, as the training data writes "<image>\\nQ".
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from monovlm.data.processor import IMAGE_MARKER, Turn
from monovlm.serve.limits import Limits, bad_request, shown_number
from monovlm.serve.limits import json_type as _json_type
from monovlm.serve.methods import FIELD as METHODS_FIELD
from monovlm.serve.methods import InferenceMethods, parse_methods

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_OPTION_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop", "seed")
_OTHER_FIELDS = ("model", "messages", "stream", "stream_options", "n", "user", METHODS_FIELD)
# settings we do not implement, accepted only at the value that means "off"
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
_DATA_URI = re.compile(r"data:(?P<params>[^,]*),(?P<payload>.*)", re.DOTALL)
MIN_TEMPERATURE = 1e-3  # below it, sampling is greedy in all but name, and logits / temperature can overflow
MAX_SEED = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; larger ones would fail inside generation


@dataclass
class ImagePart:
    data: bytes  # the decoded file bytes (not yet checked to be an image: the safe loader does that)
    name: str  # where it came from, for error messages: "messages[0].content[1].image_url"


@dataclass
class GenerationOptions:
    """How to generate one answer.

    A new per-request setting is a field here, a few lines in `parse_options`, and — when rows with different values
    cannot share one batched forward — a term of `batch_key`; the worker passes the lead row's settings to
    generation. Token reduction and the decoding strategy (`methods`) are such settings.
    """

    max_tokens: int | None = None  # None: the server's default, cut to what the context leaves
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    methods: InferenceMethods = field(default_factory=InferenceMethods)  # token reduction, decoding strategy

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests whose keys are equal may share one batched generation; None: run alone.

        One sampler serves a whole batch, so its settings must agree; greedy decoding ignores them. max_tokens and
        stop strings are tracked per row, so they never split a batch. A seeded request runs alone: its random
        stream must not depend on which other requests happened to arrive with it. The reduction and decoding
        strategy apply to the whole batch, so only requests with equal methods share one (`InferenceMethods.key`)."""
        methods = self.methods.key()
        if methods is None or (not self.greedy and self.seed is not None):
            return None
        if self.greedy:
            return ("greedy", methods)
        return ("sample", self.temperature, self.top_p, self.top_k, methods)


@dataclass
class ChatRequest:
    turns: list[Turn]
    images: list[ImagePart]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with token counts
    model: str | None = None


def parse_chat_request(raw: bytes, limits: Limits) -> ChatRequest:
    """The raw request body -> ChatRequest, or RequestError (400) naming the field and the reason."""
    body = _parse_json(raw)
    known = set(_OPTION_FIELDS) | set(_OTHER_FIELDS) | set(_NEUTRAL)
    for name in body:
        if name not in known:
            raise bad_request(f"field {name!r} is not supported by this server (it accepts: {', '.join(sorted(known))})",
                              param=name, code="unsupported_field")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in (None, neutral):
            raise bad_request(f"{name}={body[name]!r} is not supported; only {neutral!r} (off)", param=name,
                              code="unsupported_value")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise bad_request(f"n={n!r}: this server returns one choice per request; use n=1", param="n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, not {_json_type(model)}", param="model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request(f"user must be a string, not {_json_type(body['user'])}", param="user")
    stream = _optional_bool(body, "stream", False)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise bad_request('stream_options must be an object with at most "include_usage"', param="stream_options")
        include_usage = _optional_bool(stream_options, "include_usage", False, "stream_options.include_usage")
    turns, images = parse_messages(body.get("messages"), limits)
    options = parse_options(body, limits)
    options.methods = parse_methods(body.get(METHODS_FIELD), len(images))
    return ChatRequest(turns, images, options, stream, include_usage, model)


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as error:
        raise bad_request(f"request body is not UTF-8 text ({error.reason} at byte {error.start})",
                          code="invalid_json") from error
    except json.JSONDecodeError as error:
        raise bad_request(f"request body is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
                          code="invalid_json") from error
    except RecursionError as error:
        raise bad_request("request body nests JSON too deeply", code="invalid_json") from error
    except ValueError as error:  # an integer literal of more digits than Python converts (4,300 by default)
        if "digits" not in str(error):
            raise bad_request(f"request body cannot be read as JSON ({error})", code="invalid_json") from error
        raise bad_request(f"request body holds an integer of more than {sys.get_int_max_str_digits()} digits, which "
                          "this server does not read", code="invalid_json") from error
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    return body


# ---------------------------------------------------------------------------------------------------------------------
# messages


def parse_messages(messages: Any, limits: Limits) -> tuple[list[Turn], list[ImagePart]]:
    if messages is None:
        raise bad_request("messages is required: a list of {role, content} objects", param="messages")
    if not isinstance(messages, list):
        raise bad_request(f"messages must be a non-empty list, not {_json_type(messages)}", param="messages")
    if not messages:
        raise bad_request("messages is an empty list; it needs at least the user's message", param="messages")
    if len(messages) > limits.max_messages:
        raise bad_request(f"messages has {len(messages)} entries, over the limit of {limits.max_messages}",
                          param="messages", code="too_many_messages")
    turns: list[Turn] = []
    images: list[ImagePart] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content, not {_json_type(message)}", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad_request(f"{where} has unsupported field(s) {sorted(extra)} (tool calls are not supported)", where)
        role = ROLES.get(message.get("role")) if isinstance(message.get("role"), str) else None
        if role is None:
            raise bad_request(f"{where}.role={message.get('role')!r} is not one of {sorted(ROLES)}", f"{where}.role")
        text = _message_text(message.get("content"), role, f"{where}.content", images, limits)
        turns.append(Turn(role, text))
    if turns[-1].role != "user":
        raise bad_request(f"the last message is the {turns[-1].role}'s; it must be the user's (the model answers it)",
                          f"messages[{len(turns) - 1}].role")
    return turns, images


def _message_text(content: Any, role: str, where: str, images: list[ImagePart], limits: Limits) -> str:
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} must be a string or a non-empty list of parts, not {_json_type(content)}", where)
    pieces: list[str] = []  # text pieces and IMAGE_MARKERs, in order
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string, not {_json_type(part.get('text'))}", f"{at}.text")
            _check_text(part["text"], f"{at}.text")
            pieces.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: only user messages may hold images, not {role} messages", at)
            if len(images) >= limits.max_images:
                raise bad_request(f"{at}: more than {limits.max_images} images in one request (the limit)", at,
                                  code="too_many_images")
            images.append(ImagePart(_image_bytes(part.get("image_url"), f"{at}.image_url"), f"{at}.image_url"))
            pieces.append(IMAGE_MARKER)
        else:
            shown = _json_type(part) if not isinstance(part, dict) else f"type {kind!r}"
            raise bad_request(f"{at} must be a part of type 'text' or 'image_url', not {shown}", at)
    text = pieces[0]
    for previous, piece in itertools.pairwise(pieces):
        images_touch = previous == IMAGE_MARKER and piece == IMAGE_MARKER
        text += ("" if images_touch else "\n") + piece
    return text


def _check_text(text: str, where: str) -> None:
    """Text must be encodable (JSON may spell unpaired UTF-16 surrogates, which are not characters) and must not
    contain the image marker."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise bad_request(f"{where} contains an unpaired surrogate ({text[error.start]!r} at character "
                          f"{error.start}), which is not a character", where, code="invalid_text") from error
    if IMAGE_MARKER in text:
        raise bad_request(f"{where} contains {IMAGE_MARKER!r}, which marks where an image goes; images are placed by "
                          "image_url parts, so remove it from the text", where, code="reserved_text")


def _image_bytes(image_url: Any, where: str) -> bytes:
    """The bytes of an inline data URI (`data:image/png;base64,...`); anything else is refused."""
    if isinstance(image_url, dict):
        extra = set(image_url) - {"url", "detail"}
        if extra:
            raise bad_request(f"{where} has unsupported field(s) {sorted(extra)}", where)
        url = image_url.get("url")
        where = f"{where}.url"
    else:
        url = image_url
    if not isinstance(url, str):
        raise bad_request(f"{where} must be a string (a data URI), not {_json_type(url)}", where)
    found = _DATA_URI.fullmatch(url) if url[:5].lower() == "data:" else None
    if found is None:
        scheme = url.split(":", 1)[0] if ":" in url[:16] else "no scheme"
        raise bad_request(f"{where}: only inline data URIs are accepted (data:image/png;base64,...); this server never "
                          f"fetches URLs, so this {scheme!r} URL cannot be used", where, code="image_url_not_supported")
    params = [p.strip().lower() for p in found["params"].split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise bad_request(f"{where}: media type {media_type!r} is not an image type", where, code="invalid_image")
    if params[-1] != "base64":
        raise bad_request(f"{where}: the data URI must be base64-encoded (data:image/png;base64,...)", where,
                          code="invalid_image")
    payload = found["payload"]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (MIME style) is still base64
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"{where}: the data URI's payload is not valid base64 ({error})", where,
                          code="invalid_base64") from error


# ---------------------------------------------------------------------------------------------------------------------
# generation options


def parse_options(body: dict[str, Any], limits: Limits) -> GenerationOptions:
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:  # logits / temperature would overflow
        raise bad_request(f"temperature={temperature} is below {MIN_TEMPERATURE}; use 0 for greedy decoding",
                          "temperature")
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 1, None)
    max_tokens = _integer(body, "max_tokens", 1, None)
    completion = _integer(body, "max_completion_tokens", 1, None)
    if max_tokens is not None and completion is not None and max_tokens != completion:
        raise bad_request(f"max_tokens={max_tokens} and max_completion_tokens={completion} disagree; give one",
                          "max_tokens")
    max_tokens = max_tokens if max_tokens is not None else completion
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens={shown_number(max_tokens)} is over this server's limit of {limits.max_tokens}",
                          "max_tokens", code="max_tokens_too_large")
    seed = _integer(body, "seed", 0, MAX_SEED - 1)
    return GenerationOptions(max_tokens=max_tokens, temperature=0.0 if temperature is None else temperature,
                             top_p=top_p, top_k=top_k, stop=_stop(body.get("stop"), limits), seed=seed)


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise bad_request(f"{name} must be a finite number, not {_json_type(value)}", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"{name}={shown_number(value)} is outside {interval}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise bad_request(f"{name} must be an integer, not {_json_type(value)}", name)
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise bad_request(f"{name}={shown_number(value)} must be >= {low}{upper}", name)
    return value


def _finite(value: int | float) -> bool:
    """math.isfinite without its OverflowError: an integer too large for a float is still finite, but out of range."""
    return isinstance(value, int) or math.isfinite(value)


def _stop(value: Any, limits: Limits) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, not {_json_type(value)}", "stop")
    if len(stops) > limits.max_stop:
        raise bad_request(f"stop has {len(stops)} strings, over the limit of {limits.max_stop}", "stop")
    for stop in stops:
        if not stop or len(stop) > limits.max_stop_chars:
            raise bad_request(f"stop string {stop!r} must have 1 to {limits.max_stop_chars} characters", "stop")
        try:
            stop.encode("utf-8")
        except UnicodeEncodeError as error:
            raise bad_request(f"stop string {stop!r} contains an unpaired surrogate, which is not a character",
                              "stop") from error
    return tuple(stops)


def _optional_bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{param or name} must be true or false, not {_json_type(value)}", param or name)
    return value
