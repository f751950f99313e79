"""The HTTP server: an OpenAI-compatible chat-completions API, a health check, and a web page, over one model.

    POST /v1/chat/completions   text + inline images (data URIs) -> an answer, whole or streamed (server-sent events)
    GET  /v1/models             the one model served
    GET  /health                liveness and load (never needs the API key)
    GET  /                      the web page: pick or drop an image, ask, watch the answer stream in

A request goes: API key -> body read, within body_timeout_s and its size limit, its bytes counted against the
server's max_buffered_bytes -> admission (at most max_batch + max_queue requests in the server; beyond that 429 with
Retry-After) -> JSON validated (messages.py) -> size checks that need no tokenizer and no pixels: the text's bytes
against the context (no token covers more than the vocabulary's longest token, so a text that long cannot fit and is
refused before it is tokenized) and the images' header sizes against max_image_pixels and max_request_pixels ->
images decoded one at a time by the safe loader and shrunk to the model's size at once, each waiting for its pixels in
the server-wide decode budget (max_decode_pixels) -> prompt built, token reduction / decoding strategy checked against
the model's depth, context check -> the batch worker. Parsing, decoding and tokenizing run in a small thread pool
(`prepare_threads`), never on the event loop, so /health and small requests are answered meanwhile; images over
`large_image_pixels` are decoded in a lane of their own (`large_decode_threads`), so that small requests never wait
behind them and big decodes leave the other cores to the model.

Body before admission: a client that sends its body slowly holds a connection (bounded by max_connections,
header_timeout_s and body_timeout_s, see `server_config`) but never one of the admission slots that finished
requests need. Everything a client can get wrong is a 4xx with a JSON error naming the field; an unexpected error
while reading a request's content is a 422 (and logged), since only the request can have caused it there; a 5xx
means a bug in generation or a shutdown.

Memory is bounded by construction (limits.py gives the figures): request bytes <= max_buffered_bytes until their
images are decoded; decoded source images <= max_decode_pixels x BYTES_PER_DECODED_PIXEL; queued jobs hold only image
tensors at the model's size and token ids.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anyio
import h11
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from monovlm.data.images import SUPPORTED_FORMATS, ImageLoadError, load_image, resized_size
from monovlm.data.processor import IMAGE_MARKER, Processor
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.serve.batching import BatchWorker, Delta, Failed, Finished, Job, QueueFull
from monovlm.serve.limits import Limits, RequestError, bad_request
from monovlm.serve.messages import ChatRequest, ImagePart, parse_chat_request
from monovlm.serve.methods import FIELD as METHODS_FIELD
from monovlm.serve.methods import MethodError
from monovlm.serve.prompt import Prompt, PromptError, chat_prompt

log = logging.getLogger("monovlm.serve")

DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit, so that the client,
# still sending, receives the 413 instead of a broken connection; beyond that the connection is simply closed
TOKEN_BYTES_MARGIN = 4  # added to the longest token's bytes: a decoder may drop a leading space (Metaspace's "▁")


@dataclass
class ServedModel:
    name: str  # the id clients see in /v1/models (the model folder's name)
    model: torch.nn.Module
    processor: Processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def context(self) -> int:
        """The most tokens (prompt + answer) the model can attend over."""
        return self.model.config.decoder.max_position_embeddings

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token can stand for: a text of n bytes is at least n / this many tokens, which
        lets the server refuse a text that cannot fit the context before tokenizing it."""
        backend = self.tokenizer.backend
        ids = sorted(backend.get_vocab(with_added_tokens=True).values())
        texts = backend.decode_batch([[token] for token in ids], skip_special_tokens=False)
        return max((len(text.encode("utf-8", "replace")) for text in texts), default=1) + TOKEN_BYTES_MARGIN


def load_served_model(folder: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ServedModel:
    """A monovlm model folder (default: the shipped tiny model) ready to serve."""
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.tokenizer import Tokenizer

    folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    model = EncoderFreeVLM.load(folder, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer.from_folder(folder)
    return ServedModel(folder.resolve().name, model, Processor(tokenizer, model.config.vision, model.config.processor))


# ---------------------------------------------------------------------------------------------------------------------
# admission and budgets: hard bounds on what the server holds


class _Ticket:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    def release(self) -> None:  # idempotent; called from the event loop or the worker thread
        with self._admission.lock:
            if not self._released:
                self._released = True
                self._admission.count -= 1


class Admission:
    """Counts requests from admission until their job ends (or they fail before queueing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.lock = threading.Lock()

    def try_enter(self) -> _Ticket | None:
        with self.lock:
            if self.count >= self.capacity:
                return None
            self.count += 1
        return _Ticket(self)


class BufferBudget:
    """Bytes of requests held in memory (bodies being received, then their image files until decoded), all
    requests together. Used from the event loop only, so it needs no lock."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.used = 0
        self.receiving = 0  # bodies being read now (for /health)

    def hold(self) -> BufferHold:
        return BufferHold(self)


class BufferHold:
    """One request's share of the BufferBudget; `release` (idempotent) gives it back."""

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        self.size = 0

    def add(self, size: int) -> None:
        if self.budget.used + size > self.budget.capacity:
            raise RequestError(429, f"the server is receiving too many request bytes at once (max_buffered_bytes="
                               f"{self.budget.capacity}); retry after {self.budget.retry_after_s} s",
                               code="server_busy", headers={"Retry-After": str(self.budget.retry_after_s),
                                                            "Connection": "close"})
        self.budget.used += size
        self.size += size

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0


class PixelBudget:
    """Source pixels being decoded, all requests together (max_decode_pixels): an image waits, without holding a
    thread, until its pixels fit. Decoded pixels are what a big image costs in memory, not its file size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(pixels, self.capacity)  # callers never ask for more; an image over it could never start
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()


# ---------------------------------------------------------------------------------------------------------------------
# preparing a request (each step runs in a worker thread)


@dataclass
class Prepared:
    prompt: Prompt
    max_tokens: int


def declared_pixels(part: ImagePart) -> int | None:
    """Width x height from the image's header (no pixel decoded), or None when the header cannot be read (the safe
    loader then refuses the image with the reason, again before decoding)."""
    try:
        with Image.open(io.BytesIO(part.data), formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
    except Exception:  # any unreadable header: load_image names the fault
        return None
    return width * height


def _image_pixel_limit(served: ServedModel, limits: Limits) -> int:
    return min(limits.max_image_pixels, served.processor.vision.max_source_pixels)


def check_sizes(served: ServedModel, chat: ChatRequest, limits: Limits) -> list[int]:
    """Refuse what is too big before any tokenizing or decoding; return the pixels each image's decode reserves in
    the server's budget (0 for an image the loader will refuse from its header).

    - text: no token stands for more than `served.max_token_bytes` bytes, so n bytes are at least
      n / max_token_bytes tokens; a text that is surely over the context is refused without being tokenized (the
      tokenizer holds the GIL: a 9 MiB text stalls every thread, the event loop included, for seconds).
    - images: the pixels of all images of the request (from their headers) against max_request_pixels."""
    text_bytes = sum(len(turn.text.replace(IMAGE_MARKER, "").encode("utf-8")) for turn in chat.turns)
    least_tokens, context = math.ceil(text_bytes / served.max_token_bytes), served.context
    if least_tokens >= context:
        raise bad_request(f"the prompt's text is {text_bytes} bytes, at least {least_tokens} tokens (no token of this "
                          f"model stands for more than {served.max_token_bytes} bytes), and the model's context is "
                          f"{context} tokens: no room left for an answer; shorten the conversation", "messages",
                          code="context_length_exceeded")
    cap = _image_pixel_limit(served, limits)
    declared = [declared_pixels(part) for part in chat.images]
    known = [count for count in declared if count is not None and count <= cap]  # over the cap: refused unread
    if sum(known) > limits.max_request_pixels:
        raise bad_request(f"the request's images have {sum(known)} pixels together ({' + '.join(map(str, known))}), "
                          f"over the limit of {limits.max_request_pixels} (max_request_pixels); send fewer or smaller "
                          "images", "messages", code="image_too_large")
    # what each decode reserves: an unreadable header is refused by the loader before decoding, but reserve the cap
    # anyway, in case the loader reads what the peek could not
    return [cap if count is None else count if count <= cap else 0 for count in declared]


def shrink_to_model(image: Image.Image, served: ServedModel) -> Image.Image:
    """The image resized to the size the model reads it at, as `image_to_tensor` would resize it (same call, so the
    same pixels), so that the large source can be freed before the next image is decoded. Kept as it is when the
    resize policy would size the result differently again (extreme aspect ratios under min_pixels)."""
    vision = served.processor.vision
    height, width = resized_size(image.height, image.width, vision)
    if (height, width) == (image.height, image.width) or resized_size(height, width, vision) != (height, width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)


def decode_image(served: ServedModel, part: ImagePart, limits: Limits) -> Image.Image:
    """One image through the safe loader, shrunk to the model's size; or RequestError naming the image part."""
    try:
        image = load_image(part.data, max_source_pixels=_image_pixel_limit(served, limits), name=part.name)
    except ImageLoadError as error:
        code = "image_too_large" if "pixels" in error.reason and "limit" in error.reason else "invalid_image"
        raise bad_request(str(error), part.name, code=code) from error
    return shrink_to_model(image, served)


def prepare(served: ServedModel, chat: ChatRequest, limits: Limits,
            pictures: list[Image.Image] | None = None) -> Prepared:
    """Build the prompt and fit max_tokens into the context; or RequestError. `pictures`: the request's images,
    decoded already (the server decodes them one by one under its pixel budget); None: check sizes and decode here."""
    if pictures is None:
        check_sizes(served, chat, limits)
        pictures = [decode_image(served, part, limits) for part in chat.images]
    try:
        prompt = chat_prompt(served.processor, chat.turns, pictures)
    except PromptError as error:
        raise bad_request(str(error), "messages", code="invalid_prompt") from error
    try:
        chat.options.methods.check_model(served.model.config.decoder.num_layers)
    except MethodError as error:
        raise bad_request(f"{METHODS_FIELD}.{error}", f"{METHODS_FIELD}.{error.name}", code="unsupported_value") from error
    length, context = len(prompt.ids), served.context
    room = context - length
    images = f" ({prompt.image_tokens} of them for {len(pictures)} image(s))" if pictures else ""
    if room < 1:
        raise bad_request(f"the prompt is {length} tokens{images}, and the model's context is {context} tokens: no "
                          "room left for an answer; shorten the conversation or send fewer images", "messages",
                          code="context_length_exceeded")
    max_tokens = chat.options.max_tokens or min(limits.default_max_tokens, room)
    if max_tokens > room:
        raise bad_request(f"the prompt is {length} tokens{images}; with max_tokens={max_tokens} that is "
                          f"{length + max_tokens}, over the model's context of {context} tokens (max_tokens may be "
                          f"at most {room} here)", "max_tokens", code="context_length_exceeded")
    return Prepared(prompt, max_tokens)


async def read_body(request: Request, limits: Limits, held: BufferHold | None = None) -> bytes:
    """The body, read within limits.body_timeout_s; RequestError(413) once it passes max_body_bytes (the rest is read
    and dropped, up to a bound), 408 when it is too slow, 429 when `held` (the server's buffer) is full."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise bad_request(f"the Content-Length header {declared[:40]!r} is not a number")
        if len(declared) > 18 or int(declared) > DRAIN_FACTOR * limit:  # 18 digits: always readable, ~1 EB
            raise _too_large(int(declared) if len(declared) <= 18 else 10**18, limit)
    chunks, size = [], 0
    if held is not None:
        held.budget.receiving += 1
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    if held is not None:
                        held.add(len(chunk))
                    chunks.append(chunk)
                elif size > DRAIN_FACTOR * limit:
                    break
    except ClientDisconnect as error:
        raise bad_request("the client disconnected while sending the body", code="client_disconnected") from error
    except TimeoutError as error:
        raise RequestError(408, f"the request body did not arrive within {limits.body_timeout_s} s "
                           f"(body_timeout_s; {size} bytes came)", code="body_timeout",
                           headers={"Connection": "close"}) from error
    finally:
        if held is not None:
            held.budget.receiving -= 1
    if size > limit:
        raise _too_large(size if declared is None else int(declared), limit)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is {'over ' if size > DRAIN_FACTOR * limit else ''}{size} bytes, "
                        f"over the limit of {limit} bytes (max_body_bytes; images count 4/3 of their file size as "
                        "base64)", code="body_too_large")


def _unprocessable(error: Exception) -> RequestError:
    """An unexpected error while reading a request's content: only the request's content can have caused it, so the
    client gets a 4xx saying so (and the server's log the traceback, since a named check should have caught it)."""
    log.exception("unexpected error while reading a request (answered 422)")
    reason = str(error)
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    return RequestError(422, f"the request could not be processed ({type(error).__name__}: {reason})",
                        code="unprocessable_request")


# ---------------------------------------------------------------------------------------------------------------------
# the app


def create_app(served: ServedModel, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `served`. Its lifespan starts and stops the batch worker (use TestClient as a context
    manager, or `server_config` / `run_server`, which also bound connections and header times)."""
    limits = limits or Limits()
    worker = BatchWorker(served.model, served.tokenizer, served.processor.stop_ids, served.tokenizer.pad_id or 0,
                         max_batch=limits.max_batch, max_queue=limits.max_queue)
    admission = Admission(limits.max_batch + limits.max_queue)
    buffer = BufferBudget(limits.max_buffered_bytes, limits.retry_after_s)
    page = resources.files("monovlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    created = int(time.time())
    served.max_token_bytes  # computed now (a pass over the vocabulary) rather than inside the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.prepare_limiter = anyio.CapacityLimiter(limits.prepare_threads)
        app.state.large_limiter = anyio.CapacityLimiter(limits.large_decode_threads)
        app.state.pixels = PixelBudget(limits.max_decode_pixels)  # made in the event loop it serves
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="monovlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.worker, app.state.admission, app.state.limits = served, worker, admission, limits
    app.state.buffer = buffer

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # unknown path, method
        body = RequestError(error.status_code, str(error.detail), code=f"http_{error.status_code}").body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:  # a bug: JSON like every other answer
        return JSONResponse(_server_error(f"internal error ({type(error).__name__}); see the server's log"),
                            status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "in_server": admission.count, "capacity": admission.capacity,
                "queued": worker.queued(), "batches": dict(sorted(worker.batch_sizes.items())),
                "receiving": buffer.receiving, "buffered_bytes": buffer.used, "decoding_pixels": app.state.pixels.used,
                "connections": app.state.connections.open if hasattr(app.state, "connections") else None}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "monovlm", "context_length": served.context}]}

    async def in_thread(function, *args, large: bool = False):
        limiter = app.state.large_limiter if large else app.state.prepare_limiter
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)

    async def read_request(chat: ChatRequest) -> Prepared:
        """Size checks, images decoded one by one under the pixel budget (large ones in their own lane), the prompt:
        each step in a thread."""
        pixels = await in_thread(check_sizes, served, chat, limits)
        pictures = []
        for part, count in zip(chat.images, pixels):
            async with app.state.pixels.hold(count):
                pictures.append(await in_thread(decode_image, served, part, limits,
                                                large=count > limits.large_image_pixels))
            part.data = b""  # decoded: the file's bytes are not needed any more
        return await in_thread(prepare, served, chat, limits, pictures)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        held = buffer.hold()
        try:
            # the body first: a slow sender must not hold an admission slot while it trickles bytes in
            raw = await read_body(request, limits, held)
            ticket = admission.try_enter()
            if ticket is None:
                raise RequestError(429, f"the server is at capacity ({admission.capacity} requests in progress); "
                                   f"retry after {limits.retry_after_s} s", code="server_busy",
                                   headers={"Retry-After": str(limits.retry_after_s)})
            try:
                try:
                    chat = await in_thread(parse_chat_request, raw, limits)
                    del raw
                    if chat.model is not None and chat.model != served.name:
                        raise RequestError(404, f"model {chat.model!r} is not served here; this server serves "
                                           f"{served.name!r} (GET /v1/models)", code="model_not_found", param="model")
                    prepared = await read_request(chat)
                except RequestError:
                    raise
                except Exception as error:  # not a bug in generation: the request's content reached an unchecked path
                    raise _unprocessable(error) from error
                chat.images = []  # decoded into the prompt's tensors
                held.release()
                events: asyncio.Queue = asyncio.Queue()
                loop = asyncio.get_running_loop()

                def sink(event) -> None:  # worker thread
                    if isinstance(event, (Finished, Failed)):
                        ticket.release()
                    loop.call_soon_threadsafe(events.put_nowait, event)

                job = Job(prepared.prompt.ids, prepared.prompt.images, chat.options, prepared.max_tokens, sink)
                try:
                    worker.submit(job)
                except QueueFull as error:
                    raise RequestError(429, f"the queue is full ({error}); retry after {limits.retry_after_s} s",
                                       code="server_busy",
                                       headers={"Retry-After": str(limits.retry_after_s)}) from error
                except RuntimeError as error:  # the worker stopped: the server is shutting down
                    raise RequestError(503, "the server is shutting down", code="shutting_down") from error
            except BaseException:
                ticket.release()  # never queued: the request leaves the server here
                raise
        finally:
            held.release()
        completion = _Completion(served.name, len(prepared.prompt.ids))
        if chat.stream:
            return StreamingResponse(_stream(completion, events, job, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _whole(completion, events)
        finally:
            job.cancel()  # a no-op once finished; stops the row if this handler is cancelled (client gone, shutdown)

    return app


# ---------------------------------------------------------------------------------------------------------------------
# the HTTP server: uvicorn with bounds on connections and on the time a request's headers may take


def _raw_error(error: RequestError, reason: str) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s JSON, for a connection the app never saw (no request yet)."""
    body = json.dumps(error.body()).encode()
    headers = "".join(f"{name}: {value}\r\n" for name, value in error.headers.items())
    return (f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, with two bounds it lacks: at most `limits.max_connections` open connections
    (one more gets a 429 and is closed), and a deadline for each request's headers (`limits.header_timeout_s`, from
    the connection's first byte, or from the first byte of the next request on a kept-alive connection): a sender
    that trickles headers gets a 408 and is closed. The body's deadline is the app's (`read_body`). Header size is
    bounded by h11 (`h11_max_incomplete_event_size` in `server_config`)."""

    def __init__(self, *args, limits: Limits, count: ConnectionCount, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.count = count
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.count.open += 1
        if self.count.open > self.limits.max_connections:
            error = RequestError(429, f"the server has {self.limits.max_connections} open connections (max_connections)"
                                 f"; retry after {self.limits.retry_after_s} s", code="too_many_connections",
                                 headers={"Retry-After": str(self.limits.retry_after_s)})
            transport.write(_raw_error(error, "Too Many Requests"))
            transport.close()
            return
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.count.open -= 1
        self._stop_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # malformed HTTP: a JSON error like every other answer
        error = RequestError(400, f"{msg.rstrip('.')}: the request is not valid HTTP/1.1", code="invalid_http")
        self.transport.write(_raw_error(error, "Bad Request"))
        self.transport.close()

    def _watch_headers(self) -> None:
        """Arm the deadline while a request's headers are incomplete; disarm it once they are (or while the
        connection idles between requests, which uvicorn's keep-alive timeout bounds)."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.timeout_keep_alive_task is None:
            if self.header_deadline is None:
                self.header_deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)
        else:
            self._stop_header_deadline()

    def _stop_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            error = RequestError(408, f"the request headers did not arrive within {self.limits.header_timeout_s} s "
                                 "(header_timeout_s)", code="header_timeout")
            self.transport.write(_raw_error(error, "Request Timeout"))
            self.transport.close()


class ConnectionCount:
    """Open connections of one server (changed on its event loop only); /health reports it."""

    def __init__(self) -> None:
        self.open = 0


MAX_HEADER_BYTES = 64 * 1024  # request line + headers; h11 answers 400 and closes beyond it


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True,
                  log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app` (made by create_app): the guarded HTTP/1.1 protocol with the app's limits, a
    header size bound, and the loopback address unless `host` says otherwise."""
    limits: Limits = app.state.limits
    app.state.connections = ConnectionCount()
    protocol = functools.partial(GuardedH11Protocol, limits=limits, count=app.state.connections)
    return uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level, http=protocol,
                          ws="none", h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve `app` until interrupted (what `monovlm serve` runs)."""
    uvicorn.Server(server_config(app, host, port, access_log)).run()


# ---------------------------------------------------------------------------------------------------------------------
# responses in OpenAI's shapes


class _Completion:
    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _server_error(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "server_error"}}


async def _whole(completion: _Completion, events: asyncio.Queue) -> JSONResponse:
    pieces = []
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            pieces.append(event.text)
        elif isinstance(event, Finished):
            return JSONResponse({
                "id": completion.id, "object": "chat.completion", "created": completion.created,
                "model": completion.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": event.finish_reason}],
                "usage": completion.usage(event.completion_tokens)})
        else:
            return JSONResponse(_server_error(event.message), status_code=503 if "shutting down" in event.message
                                else 500)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(completion: _Completion, events: asyncio.Queue, job: Job, include_usage: bool):
    """Server-sent events as OpenAI streams them: a role chunk, content chunks, a chunk with finish_reason, an
    optional usage chunk, then `data: [DONE]`. A server-side failure after the headers went out is an error event."""
    try:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse(completion.chunk({"content": event.text}))
            elif isinstance(event, Finished):
                yield _sse(completion.chunk({}, event.finish_reason))
                if include_usage:
                    yield _sse({"id": completion.id, "object": "chat.completion.chunk", "created": completion.created,
                                "model": completion.model, "choices": [],
                                "usage": completion.usage(event.completion_tokens)})
                yield _sse("[DONE]")
                return
            else:
                yield _sse(_server_error(event.message))
                return
    finally:
        job.cancel()  # the client left mid-stream (or we are done): the worker stops generating for it
