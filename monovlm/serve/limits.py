"""What one request may ask of the server, and the error every refusal becomes.

Each limit guards a resource that a single request could otherwise exhaust: memory (body size, image pixels, number
of images, the waiting queue), compute (max_tokens, prompt length) or correctness (the model's context). A request
over a limit is answered with a 4xx and a JSON body that names the limit and the value that broke it, in OpenAI's
error shape so that OpenAI clients show the message:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "max_tokens_too_large"}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Limits:
    max_body_bytes: int = 10 * 2**20  # the raw JSON body; a base64 image is 4/3 of its file size
    max_images: int = 8  # images in one request, all messages together
    max_image_pixels: int = 25_000_000  # width x height of one source image, checked from its header before decoding
    max_messages: int = 64
    max_tokens: int = 512  # the most tokens one answer may ask for
    default_max_tokens: int = 128  # when the request gives none (cut further to what the context leaves)
    max_stop: int = 4  # stop strings per request (as OpenAI)
    max_stop_chars: int = 64  # characters of one stop string
    max_batch: int = 16  # rows of one batched generation
    max_queue: int = 64  # admitted requests waiting for the worker; one more gets 429 + Retry-After
    prepare_threads: int = 2  # requests decoded (base64, image, tokens) at once: bounds the memory of big images
    retry_after_s: int = 1  # what a 429 tells the client to wait

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}={value!r} must be a positive integer")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"Limits.default_max_tokens={self.default_max_tokens} is over max_tokens={self.max_tokens}")


ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


class RequestError(Exception):
    """A request the server refuses: an HTTP status (4xx for anything the client sent), a message saying what and
    why, the offending field (`param`, e.g. "messages[0].content[1].image_url") and a short machine-readable code."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> RequestError:
    return RequestError(400, message, code=code, param=param)


def json_type(value: Any) -> str:
    """How JSON would name the value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if isinstance(value, int) or math.isfinite(value) else f"{value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
