"""The server under hostile and careless clients: slow senders (a real uvicorn server on loopback, raw sockets),
connections over the limit, a text far over the context, large images (the per-request and server-wide pixel
budgets, peak memory in a subprocess), integers too long to read, and fuzzed bodies: every answer is a 2xx or a 4xx
with a JSON reason, and a normal request is still served."""

import base64
import contextlib
import io
import json
import random
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from PIL import Image, ImageDraw

from monovlm.data.images import image_to_tensor
from monovlm.serve.limits import Limits

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
import uvicorn
from fastapi.testclient import TestClient

import monovlm.serve.app as app_module
from monovlm.serve.app import create_app, load_served_model, server_config, shrink_to_model

URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def served():
    return load_served_model()


def shape_png(size=(64, 64), mode="RGB") -> bytes:
    image = Image.new(mode, size, "white")
    ImageDraw.Draw(image).ellipse((size[0] // 5, size[1] // 5, 3 * size[0] // 4, 3 * size[1] // 4), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def ask(question: str, *pngs: bytes, **settings) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
             for png in pngs]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}], **settings}


def assert_json_error(response, status: int, code: str | None = None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]
    return error


# ---------------------------------------------------------------------------------------------------------------------
# a real server on a loopback port, and raw-socket clients


@contextlib.contextmanager
def live_server(served, limits: Limits):
    """uvicorn with `server_config` (the guarded protocol `monovlm serve` runs) in a thread; yields (base url, app)."""
    app = create_app(served, limits)
    server = uvicorn.Server(server_config(app, log_level="warning", access_log=False))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def raw_connect(base: str, payload: bytes = b"") -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    if payload:
        connection.sendall(payload)
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: 30 s, then the test fails)."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def http_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def request_head(length: int, path: str = URL) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_server_binds_to_loopback_by_default(served):
    config = server_config(create_app(served))
    assert config.host == "127.0.0.1" and config.h11_max_incomplete_event_size == app_module.MAX_HEADER_BYTES


def test_slow_senders_do_not_lock_out_a_normal_request(served):
    """80 connections send headers and part of a body, then stall; 10 more stall inside their headers. A normal
    request still gets its answer while they hold their connections: bodies are read before admission, so the slow
    senders hold none of the 4 admission slots."""
    limits = Limits(max_batch=1, max_queue=3, header_timeout_s=120, body_timeout_s=120)
    with live_server(served, limits) as (base, app):
        slow_bodies = [raw_connect(base, request_head(100_000) + b'{"messages": [{"role": "user", "conte')
                       for _ in range(80)]
        slow_heads = [raw_connect(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: te") for _ in range(10)]
        try:
            health = lambda: httpx.get(f"{base}/health", timeout=30).json()  # noqa: E731
            # every slow body is being read (the old server admitted them instead, filling its 4 slots)
            wait_for(lambda: health().get("receiving") == 80 or health()["in_server"] == 4, "the slow senders")
            response = httpx.post(f"{base}{URL}", json=ask("What color is the circle?", shape_png(), max_tokens=4),
                                  timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            state = health()
            assert state["receiving"] == 80 and state["in_server"] == 0
            assert state["connections"] >= 80 + 10 + 1  # the slow ones, still held, and this request's own
            for connection in slow_bodies + slow_heads:  # none of them was answered or dropped meanwhile
                connection.setblocking(False)
                with pytest.raises(BlockingIOError):
                    connection.recv(1)
        finally:
            for connection in slow_bodies + slow_heads:
                connection.close()


def test_stalled_headers_and_bodies_get_408_and_are_closed(served):
    """Headers must arrive within header_timeout_s (on a fresh connection, one that sends nothing, and the next
    request of a kept-alive one), a body within body_timeout_s; then a 408 JSON error and the connection closes."""
    limits = Limits(header_timeout_s=1, body_timeout_s=1)
    with live_server(served, limits) as (base, app):
        silent = raw_connect(base)
        partial_head = raw_connect(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: te")
        partial_body = raw_connect(base, request_head(5000) + b'{"messages": [')
        kept_alive = raw_connect(base, b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += kept_alive.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
        while len(body) < length:  # the whole /health answer, so that the next bytes start the next request
            body += kept_alive.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
        kept_alive.sendall(b"GET /hea")  # the next request, stalled inside its request line
        for connection, code in ((silent, "header_timeout"), (partial_head, "header_timeout"),
                                 (partial_body, "body_timeout"), (kept_alive, "header_timeout")):
            status, error = http_error(read_until_closed(connection))  # answered, then closed by the server
            assert (status, error["code"]) == (408, code), error
            assert "within 1 s" in error["message"]
            connection.close()
        assert httpx.post(f"{base}{URL}", json=ask("What color?", max_tokens=2), timeout=60).status_code == 200


def test_connections_over_the_limit_get_429_and_malformed_http_400(served):
    limits = Limits(max_connections=4, header_timeout_s=120)
    with live_server(served, limits) as (base, app):
        held = [raw_connect(base, b"GET /hea") for _ in range(4)]
        try:
            wait_for(lambda: app.state.connections.open == 4, "the held connections")
            status, error = http_error(read_until_closed(raw_connect(base)))
            assert (status, error["code"]) == (429, "too_many_connections")
            assert "4 open connections" in error["message"]
        finally:
            for connection in held:
                connection.close()
        wait_for(lambda: app.state.connections.open == 0, "the connections to close")
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        # malformed HTTP (two Content-Lengths; unfinished headers past the size bound) is a JSON 400 too
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        for payload in (start + b"Content-Length: 3\r\nContent-Length: 2\r\n\r\n{}", start + b"X-Pad: " + b"a" * 100_000):
            status, error = http_error(read_until_closed(raw_connect(base, payload)))
            assert (status, error["code"]) == (400, "invalid_http")


# ---------------------------------------------------------------------------------------------------------------------
# a text far over the context


def test_a_text_over_the_context_is_refused_before_tokenizing(served, monkeypatch):
    """A 2 MiB question cannot fit a 1024-token context; it is refused from its size alone. Tokenizing it would hold
    the GIL (the whole server: event loop, /health) for seconds."""
    tokenizer = served.tokenizer
    longest: list[int] = [0]
    real_encode = tokenizer.encode

    def spy(text, *args, **kwargs):
        longest[0] = max(longest[0], len(text))
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    with TestClient(create_app(served)) as client:
        text = "circle " * (2 * 2**20 // 7)
        error = assert_json_error(client.post(URL, json=ask(text)), 400, "context_length_exceeded",
                                  f"context is {served.context} tokens", "no room")
        assert error["param"] == "messages"
        assert longest[0] < 100_000  # nothing near the 2 MiB was tokenized
        assert longest[0] <= served.context * served.max_token_bytes
        # a prompt that may fit is still tokenized and checked exactly
        assert client.post(URL, json=ask("What color?", max_tokens=2)).status_code == 200
        assert 0 < longest[0] < 100


def test_the_text_bound_never_refuses_a_prompt_that_fits(served):
    """max_token_bytes really bounds every token: n bytes are at least n / max_token_bytes tokens."""
    bound = served.max_token_bytes
    rng = random.Random(0)
    vocabulary = list(served.tokenizer.backend.get_vocab().keys())
    for _ in range(20):
        text = served.tokenizer.decode([served.tokenizer.backend.token_to_id(rng.choice(vocabulary))
                                        for _ in range(200)])
        assert len(served.tokenizer.encode(text)) >= len(text.encode()) / bound


# ---------------------------------------------------------------------------------------------------------------------
# large images: per-request and server-wide pixel budgets, decoded at the model's size


def test_images_over_the_request_pixel_budget_are_refused_before_decoding(served, monkeypatch):
    decoded = []
    real_load = app_module.load_image
    monkeypatch.setattr(app_module, "load_image", lambda *a, **k: decoded.append(1) or real_load(*a, **k))
    limits = Limits(max_image_pixels=200 * 200, max_decode_pixels=200 * 200, max_request_pixels=85_000)
    with TestClient(create_app(served, limits)) as client:
        body = ask("Compare.", shape_png((200, 200)), shape_png((200, 200)), shape_png((100, 100)))
        error = assert_json_error(client.post(URL, json=body), 400, "image_too_large", "90000 pixels",
                                  "max_request_pixels")
        assert error["param"] == "messages" and decoded == []
        ok = ask("Compare.", shape_png((200, 200)), shape_png((200, 200)), max_tokens=2)
        assert client.post(URL, json=ok).status_code == 200 and len(decoded) == 2


def test_concurrent_decoding_stays_within_the_server_pixel_budget(served, monkeypatch):
    """Six requests of two 150x150 images each, four decoding threads: the images being decoded at any moment
    never add up to more than max_decode_pixels (two of them)."""
    lock, decoding, most = threading.Lock(), [0], [0]
    real_load = app_module.load_image

    def counting_load(data, *args, **kwargs):
        with Image.open(io.BytesIO(data)) as header:
            pixels = header.width * header.height
        with lock:
            decoding[0] += pixels
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.05)  # hold the pixels a while, so that requests overlap
            return real_load(data, *args, **kwargs)
        finally:
            with lock:
                decoding[0] -= pixels

    monkeypatch.setattr(app_module, "load_image", counting_load)
    limits = Limits(max_image_pixels=150 * 150, max_decode_pixels=2 * 150 * 150, prepare_threads=4)
    with TestClient(create_app(served, limits)) as client:
        results = [None] * 6

        def post(index):
            results[index] = client.post(URL, json=ask("Same?", shape_png((150, 150)), shape_png((150, 150)),
                                                       max_tokens=2))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [r.status_code for r in results] == [200] * 6
        assert 0 < most[0] <= 2 * 150 * 150  # max_decode_pixels
        assert client.get("/health").json()["decoding_pixels"] == 0


def test_small_requests_never_wait_behind_large_decodes(served, monkeypatch):
    """Two requests whose large images are stuck decoding (as 25 MP PNGs take seconds): a request with a small image
    is answered meanwhile, and the large ones decode one at a time, in their own lane."""
    release, large_started, lock, decoding, most = threading.Event(), threading.Semaphore(0), threading.Lock(), [0], [0]
    real_load = app_module.load_image

    def slow_large_load(data, *args, **kwargs):
        with Image.open(io.BytesIO(data)) as header:
            large = header.width * header.height > 10_000
        if large:
            with lock:
                decoding[0] += 1
                most[0] = max(most[0], decoding[0])
            large_started.release()
            release.wait(60)
            with lock:
                decoding[0] -= 1
        return real_load(data, *args, **kwargs)

    monkeypatch.setattr(app_module, "load_image", slow_large_load)
    limits = Limits(large_image_pixels=10_000, prepare_threads=2, large_decode_threads=1)
    with TestClient(create_app(served, limits)) as client:
        results = {}

        def post(name, png):
            results[name] = client.post(URL, json=ask("Colour?", png, max_tokens=2))

        large = [threading.Thread(target=post, args=(f"large{i}", shape_png((200, 200)))) for i in range(2)]
        for thread in large:
            thread.start()
        assert large_started.acquire(timeout=30)  # one large image is decoding, and holds its lane
        small = threading.Thread(target=post, args=("small", shape_png((64, 64))))
        small.start()
        small.join(60)
        answered_while_stuck = "small" in results
        release.set()
        for thread in large:
            thread.join(120)
    assert answered_while_stuck and results["small"].status_code == 200
    assert [results[f"large{i}"].status_code for i in range(2)] == [200, 200]
    assert most[0] == 1  # large decodes one at a time


@pytest.mark.parametrize("size", [(64, 64), (300, 200), (2000, 30), (7, 5000), (1, 300), (33, 33), (65, 20)])
def test_shrinking_early_gives_the_same_tensor(served, size):
    image = Image.new("RGB", size)
    image.putdata([(x * 7 % 256, x * 13 % 256, x % 256) for x in range(size[0] * size[1])])
    vision = served.processor.vision
    assert torch.equal(image_to_tensor(shrink_to_model(image, served), vision), image_to_tensor(image, vision))


MEMORY_SCRIPT = """
import base64, io, json, re, sys
from pathlib import Path
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from monovlm.serve.app import create_app, load_served_model
from monovlm.serve.limits import BYTES_PER_DECODED_PIXEL, Limits

def field(name):
    return int(re.search(rf"^{name}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024

def png(width, height, mode):
    ramp = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).convert(mode).save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()

width, height, count = 3000, 2000, 8
parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(width, height, "RGBA")}}
         for _ in range(count)]
body = json.dumps({"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Same?"}]}],
                   "max_tokens": 1}).encode()
del parts
limits = Limits(max_image_pixels=width * height, max_decode_pixels=width * height, max_request_pixels=10**9)
with TestClient(create_app(load_served_model(), limits)) as client:
    small = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + png(64, 64, "RGBA")}}, {"type": "text", "text": "Same?"}]}],
        "max_tokens": 1}).encode()
    assert client.post("/v1/chat/completions", content=small).status_code == 200  # warm: threads, first forward
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = field("VmRSS")
    response = client.post("/v1/chat/completions", content=body)
    peak = field("VmHWM")
print(json.dumps({"status": response.status_code, "text": response.text[:300], "peak_over": peak - before,
                  "bound": limits.max_decode_pixels * BYTES_PER_DECODED_PIXEL, "body": len(body)}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_request_of_many_large_images_stays_under_the_documented_bound():
    """8 RGBA PNGs of 6 MP in one request (decoded all at once: 8 x 24 MB kept + one decode's working memory). With
    a decode budget of one such image, the server's peak RSS over its resting RSS stays under max_decode_pixels x
    BYTES_PER_DECODED_PIXEL (+ 32 MiB for the body and its copies)."""
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["status"] == 200, report["text"]
    assert report["peak_over"] <= report["bound"] + 32 * 2**20, report


# ---------------------------------------------------------------------------------------------------------------------
# integers too long to read, unexpected errors, fuzzed bodies: never a 5xx


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as test_client:
        yield test_client


def post_raw(client, raw: str | bytes):
    return client.post(URL, content=raw if isinstance(raw, bytes) else raw.encode(),
                       headers={"content-type": "application/json"})


BIG = "9" * 5000  # over Python's 4,300-digit limit for int <-> str conversion


@pytest.mark.parametrize("raw", [
    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": BIG}',
    '{"messages": [{"role": "user", "content": "hi"}], "temperature": -BIG}',
    '{"messages": [{"role": "user", "content": "hi"}], "seed": BIG}',
    '{"messages": [{"role": "user", "content": "hi"}], "n": BIG}',
    '{"messages": [{"role": "user", "content": BIG}]}',
    '{"messages": [{"role": "user", "content": "hi"}], "unknown": [1, 2, BIG]}',
    'BIG',
])
def test_integers_too_long_to_read_are_400(client, raw):
    error = assert_json_error(post_raw(client, raw.replace("BIG", BIG)), 400, "invalid_json", "integer of more than",
                              f"{sys.get_int_max_str_digits()} digits")
    assert len(error["message"]) < 300


@pytest.mark.parametrize("field, value", [
    ("temperature", 10**400), ("top_p", -(10**400)), ("max_tokens", 10**4000), ("seed", 10**300),
    ("monovlm", {"decoding": "vcd", "alpha": 10**400}),
    ("monovlm", {"reduction": "fastv", "keep": 10**400}),
], ids=["temperature", "top_p", "max_tokens", "seed", "alpha", "keep"])
def test_huge_but_readable_integers_are_400(client, field, value):
    body = ask("hi", shape_png(), **{field: value})
    response = post_raw(client, json.dumps(body))
    error = assert_json_error(response, 400)
    assert len(error["message"]) < 500  # not thousands of digits


def test_an_unexpected_error_from_a_request_is_a_422_json_error(client, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("an unchecked path")

    monkeypatch.setattr(app_module, "chat_prompt", broken)
    error = assert_json_error(client.post(URL, json=ask("hi")), 422, "unprocessable_request", "KeyError")
    assert "an unchecked path" in error["message"]
    monkeypatch.undo()
    assert client.post(URL, json=ask("hi", max_tokens=2)).status_code == 200
    assert client.get("/health").json()["in_server"] == 0


def _mutations(rng: random.Random, valid: dict) -> str:
    """One raw body: the valid request with one field (at any depth) replaced by junk, or the text damaged."""
    junk = ["BIGINT", "-BIGINT", "1e999", "-0", "1" * 4000, "[" * 3000 + "]" * 3000, '{"a":' * 500 + "1" + "}" * 500,
            "[[[[[[[[[[1]]]]]]]]]]", '"x"', "null", "true", "[]", "{}", '"' + "x" * 50_000 + '"',
            '{"url": "data:image/png;base64,AAAA"}', '"\\ud800"', "0.0000000000000000000001", "123456789012345678901"]
    paths = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            walk(child, (*path, key))

    walk(valid, ())
    choice = rng.random()
    text = json.dumps(valid)
    if choice < 0.8:
        path = rng.choice(paths[1:])
        body = json.loads(text)
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = "@@JUNK@@"
        return json.dumps(body).replace('"@@JUNK@@"', rng.choice(junk).replace("BIGINT", BIG))
    if choice < 0.9:  # cut short
        return text[: rng.randrange(len(text))]
    cut = rng.randrange(len(text))  # one character changed
    return text[:cut] + rng.choice('{}[]",:0e-\\') + text[cut + 1 :]


def test_fuzzed_bodies_never_cause_a_5xx(client):
    """Seeded junk at every depth of a valid request (integers too long to read, deep nesting, wrong types, huge
    strings) and damaged text: each answer is a 200 or a 4xx with a JSON reason."""
    rng = random.Random(1)
    valid = ask("What color?", shape_png(), max_tokens=2, temperature=0.5, top_p=0.9, stop=["."], seed=1,
                stream=False, monovlm={"reduction": "fastv", "keep": 0.5, "decoding": "vcd", "alpha": 1, "beta": 0.1})
    statuses = []
    for _ in range(150):
        raw = _mutations(rng, valid)
        response = post_raw(client, raw)
        statuses.append(response.status_code)
        assert response.status_code < 500, (raw[:300], response.text[:500])
        if response.status_code != 200:
            assert response.json()["error"]["message"]
    assert statuses.count(200) < len(statuses) and len(set(statuses)) > 1
    assert client.get("/health").json()["in_server"] == 0
