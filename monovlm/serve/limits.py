"""What one request may ask of the server, and the error every refusal becomes.

Each limit guards a resource that a single request could otherwise exhaust: memory (body size, image pixels, number
of images, the waiting queue), compute (max_tokens, prompt length) or correctness (the model's context). A request
over a limit is answered with a 4xx and a JSON body that names the limit and the value that broke it, in OpenAI's
error shape so that OpenAI clients show the message:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "max_tokens_too_large"}}

The memory the limits imply, above the loaded model (the server's own bound; `monovlm serve --help` repeats it):

    request bytes   <= max_buffered_bytes                    bodies being received, then their image files until
                                                             the images are decoded (256 MiB by default)
    parsing         <= prepare_threads x 2 x max_body_bytes  the JSON text being parsed and its decoded base64
                                                             (40 MiB by default)
    image decoding  <= max_decode_pixels x 34 bytes          decoded source images, all requests together: ~10 bytes
                                                             a pixel for RGB PNG / JPEG, ~21 with alpha, ~33 for a
                                                             float TIFF (by default 1.1 GB at worst, ~320 MB for RGB)
    queued requests    (max_batch + max_queue) x (image tensors at the model's size + token ids): small

Connections are bounded in number (max_connections) and in time: request headers must arrive within
header_timeout_s and a body within body_timeout_s, so a slow or stalled sender cannot hold a connection, an
admission slot or buffer memory for long; a body is read before the request is admitted, so slow senders never
hold the slots that finished requests need.
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
    max_request_pixels: int = 64_000_000  # source pixels of all of a request's images together (bounds its CPU time)
    max_decode_pixels: int = 32_000_000  # source pixels being decoded at once, all requests together (memory: x34 B)
    max_messages: int = 64
    max_tokens: int = 512  # the most tokens one answer may ask for
    default_max_tokens: int = 128  # when the request gives none (cut further to what the context leaves)
    max_stop: int = 4  # stop strings per request (as OpenAI)
    max_stop_chars: int = 64  # characters of one stop string
    max_batch: int = 16  # rows of one batched generation
    max_queue: int = 64  # admitted requests waiting for the worker; one more gets 429 + Retry-After
    prepare_threads: int = 2  # requests parsed / images decoded / prompts tokenized at once (CPU threads)
    # images with more source pixels are decoded in a lane of their own, large_decode_threads at a time: requests with
    # small images never wait behind them, and big decodes take at most that many cores from the model
    large_image_pixels: int = 1_000_000
    large_decode_threads: int = 1
    retry_after_s: int = 1  # what a 429 tells the client to wait
    max_buffered_bytes: int = 256 * 2**20  # request bytes held until their images are decoded, all requests together
    max_connections: int = 256  # open HTTP connections; one more is answered 429 and closed
    header_timeout_s: int = 10  # a request's headers must arrive within this (else 408 and the connection closes)
    body_timeout_s: int = 60  # ... and its body within this after the headers (a 10 MiB body at 1.4 Mbit/s)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}={value!r} must be a positive integer")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"Limits.default_max_tokens={self.default_max_tokens} is over max_tokens={self.max_tokens}")
        if self.max_decode_pixels < self.max_image_pixels:
            raise ValueError(f"Limits.max_decode_pixels={self.max_decode_pixels} is below max_image_pixels="
                             f"{self.max_image_pixels}: an image the server accepts could never be decoded")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"Limits.max_buffered_bytes={self.max_buffered_bytes} is below max_body_bytes="
                             f"{self.max_body_bytes}: a body the server accepts could never be received")


BYTES_PER_DECODED_PIXEL = 34  # peak bytes per source pixel while one image is decoded and shrunk to the model's
# size (measured: RGB PNG 9.5, JPEG 8.9, 16-bit PNG 16.7, RGBA PNG 21.1, float TIFF 32.8); the decode budget's cost
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
    if isinstance(value, int) and abs(value) >= 10**30:  # a huge integer: its digits would drown the message
        return f"an integer of ~{math.floor(abs(value).bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if isinstance(value, int) or math.isfinite(value) else f"{value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown_number(value: int | float) -> int | float | str:
    """A number as an error message shows it: a huge integer by its digit count (thousands of digits would drown the
    message, and past 4,300 digits Python refuses to write them)."""
    return value if not isinstance(value, int) or abs(value) < 10**30 else json_type(value)
