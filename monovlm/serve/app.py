"""The HTTP server: an OpenAI-compatible chat-completions API, a health check, and a web page, over one model.

    POST /v1/chat/completions   text + inline images (data URIs) -> an answer, whole or streamed (server-sent events)
    GET  /v1/models             the one model served
    GET  /health                liveness and load (never needs the API key)
    GET  /                      the web page: pick or drop an image, ask, watch the answer stream in

A request goes: API key -> admission (at most max_batch + max_queue requests in the server; beyond that 429 with
Retry-After, before the body is read) -> body read with its size limit -> JSON validated (messages.py) -> images
decoded by the safe loader, the prompt built and the requested token reduction / decoding strategy checked against
the model's depth (prepare(), in a small thread pool so that big images never block the event loop and at most
`prepare_threads` are decoded at once) -> context check -> the batch worker. Everything a client can get wrong is a
4xx with a JSON error naming the field; a 5xx means a bug or a shutdown.

Memory is bounded by construction: bodies in flight <= capacity x max_body_bytes, decoded source images <=
prepare_threads at a time, queued jobs hold only resized image tensors and token ids.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from monovlm.data.images import ImageLoadError, load_image
from monovlm.data.processor import Processor
from monovlm.paths import DEFAULT_MODEL_DIR
from monovlm.serve.batching import BatchWorker, Delta, Failed, Finished, Job, QueueFull
from monovlm.serve.limits import Limits, RequestError, bad_request
from monovlm.serve.messages import ChatRequest, parse_chat_request
from monovlm.serve.methods import FIELD as METHODS_FIELD
from monovlm.serve.methods import MethodError
from monovlm.serve.prompt import Prompt, PromptError, chat_prompt

DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit, so that the client,
# still sending, receives the 413 instead of a broken connection; beyond that the connection is simply closed


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


def load_served_model(folder: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ServedModel:
    """A monovlm model folder (default: the shipped tiny model) ready to serve."""
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.tokenizer import Tokenizer

    folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    model = EncoderFreeVLM.load(folder, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer.from_folder(folder)
    return ServedModel(folder.resolve().name, model, Processor(tokenizer, model.config.vision, model.config.processor))


# ---------------------------------------------------------------------------------------------------------------------
# admission: a hard bound on requests inside the server


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


# ---------------------------------------------------------------------------------------------------------------------
# preparing a request (runs in a worker thread)


@dataclass
class Prepared:
    prompt: Prompt
    max_tokens: int


def prepare(served: ServedModel, chat: ChatRequest, limits: Limits) -> Prepared:
    """Decode the images with the safe loader, build the prompt, fit max_tokens into the context; or RequestError."""
    vision = served.processor.vision
    max_pixels = min(limits.max_image_pixels, vision.max_source_pixels)
    pictures = []
    for part in chat.images:
        try:
            pictures.append(load_image(part.data, max_source_pixels=max_pixels, name=part.name))
        except ImageLoadError as error:
            code = "image_too_large" if "pixels" in error.reason and "limit" in error.reason else "invalid_image"
            raise bad_request(str(error), part.name, code=code) from error
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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or RequestError(413) once it passes `limit` bytes (the rest is read and dropped, up to a bound)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"the Content-Length header {declared!r} is not a number")
        if int(declared) > DRAIN_FACTOR * limit:
            raise _too_large(int(declared), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * limit:
                break
    except ClientDisconnect as error:
        raise bad_request("the client disconnected while sending the body", code="client_disconnected") from error
    if size > limit:
        raise _too_large(size if declared is None else int(declared), limit)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is {'over ' if size > DRAIN_FACTOR * limit else ''}{size} bytes, "
                        f"over the limit of {limit} bytes (max_body_bytes; images count 4/3 of their file size as "
                        "base64)", code="body_too_large")


# ---------------------------------------------------------------------------------------------------------------------
# the app


def create_app(served: ServedModel, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `served`. Its lifespan starts and stops the batch worker (use TestClient as a context
    manager, or uvicorn)."""
    limits = limits or Limits()
    worker = BatchWorker(served.model, served.tokenizer, served.processor.stop_ids, served.tokenizer.pad_id or 0,
                         max_batch=limits.max_batch, max_queue=limits.max_queue)
    admission = Admission(limits.max_batch + limits.max_queue)
    page = resources.files("monovlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.prepare_limiter = anyio.CapacityLimiter(limits.prepare_threads)
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="monovlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.worker, app.state.admission, app.state.limits = served, worker, admission, limits

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # unknown path, method
        body = RequestError(error.status_code, str(error.detail), code=f"http_{error.status_code}").body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

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
                "queued": worker.queued(), "batches": dict(sorted(worker.batch_sizes.items()))}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "monovlm", "context_length": served.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        ticket = admission.try_enter()
        if ticket is None:
            try:
                await read_body(request, limits.max_body_bytes)  # drained, so the client reads the 429 cleanly
            except RequestError:
                pass
            raise RequestError(429, f"the server is at capacity ({admission.capacity} requests in progress); "
                               f"retry after {limits.retry_after_s} s", code="server_busy",
                               headers={"Retry-After": str(limits.retry_after_s)})
        try:
            raw = await read_body(request, limits.max_body_bytes)
            chat = await anyio.to_thread.run_sync(parse_chat_request, raw, limits,
                                                  limiter=request.app.state.prepare_limiter)
            if chat.model is not None and chat.model != served.name:
                raise RequestError(404, f"model {chat.model!r} is not served here; this server serves "
                                   f"{served.name!r} (GET /v1/models)", code="model_not_found", param="model")
            prepared = await anyio.to_thread.run_sync(prepare, served, chat, limits,
                                                      limiter=request.app.state.prepare_limiter)
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
                                   code="server_busy", headers={"Retry-After": str(limits.retry_after_s)}) from error
        except BaseException:
            ticket.release()  # never queued: the request leaves the server here
            raise
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
