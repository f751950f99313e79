"""Load test of `monovlm serve` on loopback: many concurrent clients, valid and invalid requests mixed, with and
without hostile clients (slow senders, large images).

    python benchmarks/load_test.py                        # a clean run, then a hostile one; prints a report
    python benchmarks/load_test.py --mix clean            # the clean run only (valid and invalid requests)
    python benchmarks/load_test.py --write BENCHMARKS.md  # ...and writes it as the "## Serving: load test" section

The server runs as its own process (`python -m monovlm serve`, the shipped tiny model, a 1 MiB body limit so that
oversize bodies are cheap to send) so that its memory can be read from /proc: peak RSS (the kernel's high-water mark)
and RSS sampled over the run, to show memory stays bounded. Each client sends its requests one after another; the
kinds are drawn with a fixed seed:

    valid        an image (drawn shapes, 40-96 px) and a question; greedy or sampled; half of them streamed
    oversize     a body over the limit                      -> 413 expected
    bad_base64   an image data URI that is not base64       -> 400 expected
    wrong_types  a field of the wrong type (one of several) -> 400 expected
    large_image  (hostile mix) 1-4 drawn images of 2-6 MP each (small PNG files, large decoded) -> 200

The hostile mix also keeps `--slow-senders` connections open for the whole run, next to the clients: half send the
headers and the start of a body, half only part of their headers, then trickle one byte a second; when the server
cuts one off (408 at its header / body deadline) it reconnects. They must not lock the fast clients out: the report
gives the valid answers' p95 latency of the hostile run over the clean run's (the issue's bar: within 2x), and the
server's peak RSS against the bound its limits document (resting RSS + decode budget x 34 B + buffered bytes +
bodies being parsed).

Bounded in count (clients x requests) and in time (--time-limit: no request starts after it; each request has a
timeout). The report gives throughput, p50/p95 latency, peak RSS, counts by status code and kind, the batch sizes the
server ran, and whether any request got a 5xx or an unexpected status (exit code 1 then).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from sections import replace_section  # benchmarks/sections.py (the script's own folder)

SECTION = "## Serving: load test"
MIXES = {
    "clean": (("valid", 0.65), ("oversize", 0.10), ("bad_base64", 0.10), ("wrong_types", 0.15)),
    "hostile": (("valid", 0.58), ("large_image", 0.07), ("oversize", 0.10), ("bad_base64", 0.10),
                ("wrong_types", 0.15)),
}
EXPECTED = {"valid": {200, 429}, "oversize": {413, 429}, "bad_base64": {400, 429}, "wrong_types": {400, 429},
            "large_image": {200, 429}}
LARGE_SIZES = ((2000, 1000), (2400, 1600), (3000, 2000))  # 2, 3.8 and 6 MP: decoded, not sent, is what costs
DECODE_BUDGET_PIXELS = 32_000_000  # the server's default max_decode_pixels (Limits), for the memory bound
BYTES_PER_DECODED_PIXEL = 34  # as monovlm.serve.limits documents it
BUFFERED_BYTES = 256 * 2**20  # the server's default max_buffered_bytes
QUESTIONS = ("What color is the circle?", "How many shapes are there?", "Is there a red square in the image?",
             "What size is the triangle?", "Describe the image.")
COLORS = ((220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20), (150, 40, 170), (240, 140, 20))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def picture(rng: random.Random) -> bytes:
    size = (rng.randint(40, 96), rng.randint(40, 96))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y = rng.randint(0, size[0] - 12), rng.randint(0, size[1] - 12)
        box = (x, y, x + rng.randint(8, 24), y + rng.randint(8, 24))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLORS))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


_LARGE: dict[tuple[int, int], str] = {}  # size -> data URI, drawn once (encoding MP images costs the clients CPU)


def large_picture(size: tuple[int, int]) -> str:
    if size not in _LARGE:
        image = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for index in range(6):
            x, y = (index * 397) % (size[0] - 300), (index * 211) % (size[1] - 300)
            box = (x, y, x + 120 + index * 30, y + 100 + index * 25)
            (draw.ellipse if index % 2 else draw.rectangle)(box, fill=COLORS[index % len(COLORS)])
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        _LARGE[size] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return _LARGE[size]


def make_request(kind: str, rng: random.Random, body_limit: int) -> tuple[bytes, bool]:
    """(raw JSON body, streamed?) of one request of the given kind."""
    uri = "data:image/png;base64," + base64.b64encode(picture(rng)).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": rng.choice(QUESTIONS)}]
    if kind == "large_image":
        images = [{"type": "image_url", "image_url": {"url": large_picture(rng.choice(LARGE_SIZES))}}
                  for _ in range(rng.randint(1, 4))]
        content = [*images, content[1]]
    body: dict = {"messages": [{"role": "user", "content": content}], "max_tokens": 16}
    if rng.random() < 0.3:
        body.update(temperature=0.7, top_p=0.9)
    stream = kind == "valid" and rng.random() < 0.5
    if stream:
        body["stream"] = True
    if kind == "oversize":
        content[1]["text"] += " padding" * (body_limit // 8 + rng.randint(1_000, 20_000))
    elif kind == "bad_base64":
        content[0]["image_url"]["url"] = "data:image/png;base64," + rng.choice(["@@not base64@@", "AAA", "iVBOR!w0KGgo"])
    elif kind == "wrong_types":
        mutation = rng.randrange(6)
        if mutation == 0:
            body["temperature"] = "warm"
        elif mutation == 1:
            body["max_tokens"] = "16"
        elif mutation == 2:
            body["messages"] = {"role": "user", "content": "hi"}
        elif mutation == 3:
            content[1]["text"] = 42
        elif mutation == 4:
            content[0]["image_url"] = {"url": ["data:image/png;base64,AAAA"]}
        else:
            body["stop"] = {"at": "."}
    return json.dumps(body).encode(), stream


class MemoryWatch:
    """Samples the server's RSS from /proc every `interval` seconds; peak RSS is the kernel's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (time.perf_counter(), RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def field(self, name: str) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self.field("VmRSS")))
            except (OSError, AttributeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def client(index: int, base: str, args, mix: str, deadline: float, results: list) -> None:
    rng = random.Random(args.seed * 100_003 + index)
    kinds, weights = zip(*MIXES[mix])
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as http:
        for number in range(args.requests):
            if time.perf_counter() > deadline:
                results.append({"kind": "not_sent", "status": "not sent (time limit)", "latency": 0.0})
                continue
            kind = rng.choices(kinds, weights)[0]
            raw, stream = make_request(kind, rng, args.body_limit)
            started = time.perf_counter()
            record = {"kind": kind, "stream": stream}
            try:
                response = await http.post("/v1/chat/completions", content=raw,
                                           headers={"content-type": "application/json"})
                record["status"] = response.status_code
                if response.status_code == 200:
                    text = response.text
                    record["complete"] = text.rstrip().endswith("data: [DONE]") if stream else \
                        "choices" in json.loads(text)
                elif response.status_code < 500:
                    record["complete"] = bool(response.json()["error"]["message"])  # a JSON error saying why
            except httpx.HTTPError as error:
                record["status"] = f"client error: {type(error).__name__}"
            record["latency"] = time.perf_counter() - started
            results.append(record)


async def slow_sender(index: int, port: int, stop: asyncio.Event, outcomes: Counter) -> None:
    """Holds a connection open with a request it never finishes (one byte a second), reconnecting when cut off."""
    body_start = b'{"messages": [{"role": "user", "content": "'
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["could not connect"] += 1
            await asyncio.sleep(1)
            continue
        if index % 2:  # stalls inside its headers
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: load-test\r\nX-Slow: ")
        else:  # stalls inside its body
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: load-test\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 100000\r\n\r\n" + body_start)
        outcome = "held to the end"
        try:
            while not stop.is_set():
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                except asyncio.TimeoutError:
                    writer.write(b"a")  # one more byte: a header value's or a JSON string's
                    continue
                outcome = f"cut off: {answer.split(b' ', 2)[1].decode()}" if answer.startswith(b"HTTP/") else \
                    "cut off: closed"
                break
        except (OSError, IndexError, UnicodeDecodeError) as error:
            outcome = f"cut off: {type(error).__name__}"
        outcomes[outcome] += 1
        writer.close()


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "monovlm", "serve", "--port", str(port), "--no-access-log",
               "--max-body-mb", str(args.body_limit / 2**20), "--max-batch", str(args.max_batch),
               "--max-queue", str(args.max_queue)]
    if args.model:
        command.insert(4, str(args.model))
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(args, mix: str) -> dict:
    load_before = os.getloadavg()[0]  # how busy the machine was before the server and the clients started
    slow_senders = args.slow_senders if mix == "hostile" else 0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        with MemoryWatch(server.pid) as memory:
            # one warm-up request, so that the baseline RSS includes the loaded model and a first generation
            warm_rng = random.Random(-1)
            httpx.post(f"{base}/v1/chat/completions", content=make_request("valid", warm_rng, args.body_limit)[0],
                       headers={"content-type": "application/json"}, timeout=60)
            baseline = memory.field("VmRSS")
            results: list[dict] = []
            started = time.perf_counter()
            deadline = started + args.time_limit

            slow_outcomes: Counter = Counter()

            async def everyone():
                stop = asyncio.Event()
                slow = [asyncio.create_task(slow_sender(i, port, stop, slow_outcomes)) for i in range(slow_senders)]
                await asyncio.sleep(1.0 if slow else 0)  # the slow ones connect first: the clients meet them
                await asyncio.gather(*(client(i, base, args, mix, deadline, results) for i in range(args.clients)))
                stop.set()
                await asyncio.gather(*slow)

            asyncio.run(everyone())
            wall = time.perf_counter() - started
            peak = memory.field("VmHWM")
            final = memory.field("VmRSS")
            health = httpx.get(f"{base}/health", timeout=10).json()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    sent = [r for r in results if r["kind"] != "not_sent"]
    valid_ok = [r for r in sent if r["kind"] == "valid" and r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in results)
    by_kind = {kind: dict(Counter(str(r["status"]) for r in sent if r["kind"] == kind)) for kind, _ in MIXES[mix]}
    unexpected = [r for r in sent if r["status"] not in EXPECTED[r["kind"]] or r.get("complete") is False]
    server_errors = sum(1 for r in sent if isinstance(r["status"], int) and r["status"] >= 500)
    quarter_rss = [max((rss for t, rss in memory.samples if started + (q - 1) * wall / 4 <= t <= started + q * wall / 4),
                       default=0) for q in (1, 2, 3, 4)]
    # the terms monovlm.serve.limits documents: decoding, buffered request bytes, parsing (2 threads x 2 copies)
    rss_bound = baseline + DECODE_BUDGET_PIXELS * BYTES_PER_DECODED_PIXEL + BUFFERED_BYTES + 2 * 2 * args.body_limit
    return {
        "mix": mix, "slow_senders": slow_senders, "slow_outcomes": dict(sorted(slow_outcomes.items())),
        "rss_bound_mib": rss_bound / 2**20, "within_rss_bound": peak <= rss_bound,
        "clients": args.clients, "requests_per_client": args.requests, "sent": len(sent), "wall_s": wall,
        "load_before": load_before,
        "throughput": len(sent) / wall, "answers_per_s": len(valid_ok) / wall,
        "p50_all_ms": 1000 * percentile([r["latency"] for r in sent], 50),
        "p95_all_ms": 1000 * percentile([r["latency"] for r in sent], 95),
        "p50_answer_ms": 1000 * percentile([r["latency"] for r in valid_ok], 50),
        "p95_answer_ms": 1000 * percentile([r["latency"] for r in valid_ok], 95),
        "statuses": dict(sorted(statuses.items())), "by_kind": by_kind, "server_errors": server_errors,
        "unexpected": len(unexpected), "baseline_rss_mib": baseline / 2**20, "peak_rss_mib": peak / 2**20,
        "final_rss_mib": final / 2**20, "rss_by_quarter_mib": [rss / 2**20 for rss in quarter_rss],
        "batches": health.get("batches", {}), "in_server_after": health.get("in_server"),
    }


def p95_ratio(reports: list[dict]) -> float | None:
    """The hostile run's p95 answer latency over the clean run's (None unless both ran)."""
    by_mix = {r["mix"]: r for r in reports}
    if "clean" not in by_mix or "hostile" not in by_mix:
        return None
    return by_mix["hostile"]["p95_answer_ms"] / by_mix["clean"]["p95_answer_ms"]


def markdown(reports: list[dict], command: str) -> str:
    first = reports[0]
    rows = "\n".join(
        f"| {r['mix']} | {r['sent']} | {r['wall_s']:.1f} s | {r['throughput']:.1f} req/s | {r['answers_per_s']:.1f} | "
        f"{r['p50_all_ms']:.0f} / {r['p95_all_ms']:.0f} ms | {r['p50_answer_ms']:.0f} / {r['p95_answer_ms']:.0f} ms | "
        f"{r['server_errors']} | {r['unexpected']} | {r['peak_rss_mib']:.0f} MiB ({r['rss_bound_mib']:.0f}) |"
        for r in reports)
    ratio = p95_ratio(reports)
    ratio_line = "" if ratio is None else (
        f"\nUnder the hostile mix the valid requests' p95 latency is {ratio:.2f}x the clean run's (the bar: at most "
        "2x; no lock-out of fast clients).\n")
    details = []
    for r in reports:
        statuses = ", ".join(f"{status}: {count}" for status, count in r["statuses"].items())
        kinds = "\n".join(f"| {kind} | {sum(counts.values())} | "
                          + ", ".join(f"{s}: {c}" for s, c in sorted(counts.items())) + " |"
                          for kind, counts in r["by_kind"].items())
        batches = ", ".join(f"{size}: {count}"
                            for size, count in sorted(r["batches"].items(), key=lambda kv: int(kv[0])))
        quarters = " / ".join(f"{rss:.0f}" for rss in r["rss_by_quarter_mib"])
        slow = ""
        if r["slow_senders"]:
            outcomes = ", ".join(f"{outcome}: {count}" for outcome, count in r["slow_outcomes"].items())
            slow = (f"\n{r['slow_senders']} slow senders held connections through the run; their connections "
                    f"ended: {outcomes}.\n")
        details.append(f"""### {r['mix']} run

Status codes: {statuses}.
Unexpected statuses (or a 200 without a complete answer, or a 4xx without a JSON reason): {r['unexpected']}.
{slow}
| kind | sent | statuses |
|---|---:|---|
{kinds}

Server memory (RSS of the server process): {r['baseline_rss_mib']:.0f} MiB after loading and one answer; peak (VmHWM)
{r['peak_rss_mib']:.0f} MiB, under the bound the limits document ({r['rss_bound_mib']:.0f} MiB: resting RSS + decode
budget x {BYTES_PER_DECODED_PIXEL} B + buffered bytes + bodies being parsed): {'yes' if r['within_rss_bound'] else 'NO'};
{r['final_rss_mib']:.0f} MiB at the end. Highest RSS within each quarter of the run: {quarters} MiB. Batch sizes the worker ran (size: count):
{batches}.
""")
    runs = " and ".join(r["mix"] for r in reports)
    hostile = ""
    for r in reports:
        if r["mix"] == "hostile":
            hostile = (f" The hostile run mixes in large-image requests (7%: 1-4 drawn PNGs of 2-6 MP each) and keeps "
                       f"{r['slow_senders']} slow senders (half stalled in their headers, half in their bodies, one "
                       "byte a second) connected all along.")
    return f"""{SECTION}

Command: `{command}`

{first['clients']} concurrent clients × {first['requests_per_client']} requests each, on loopback, against
`python -m monovlm serve` (the shipped tiny model on CPU, 1 MiB body limit, max batch 16, queue 64), one fresh server
per run ({runs}). Date {time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU cores ({platform.machine()}), shared with the
clients themselves and with whatever else ran (1-minute load average {first['load_before']:.1f} just before the first
server started): the throughput and latencies are what this machine gave, not a capacity figure. Requests mix valid
questions about a drawn image (65%; 30% of them sampled, half streamed, max_tokens 16), oversize bodies (10%), bad
base64 (10%) and fields of wrong types (15%).{hostile}

| run | requests | wall time | throughput | answers/s | latency p50 / p95 (all) | latency p50 / p95 (answers) | 5xx | unexpected | peak RSS (bound) |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}
{ratio_line}
""" + "\n".join(details)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", choices=("clean", "hostile", "both"), default="both",
                        help="clean: valid and invalid requests (the original load test); hostile: plus large images "
                             "and slow senders; both: one run of each, on fresh servers, compared")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--slow-senders", type=int, default=32, help="connections stalled by the hostile mix")
    parser.add_argument("--time-limit", type=float, default=600, help="no request starts after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--body-limit", type=int, default=2**20, help="the server's --max-body-mb, in bytes")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="write the report as a section of this markdown file")
    args = parser.parse_args()
    mixes = ("clean", "hostile") if args.mix == "both" else (args.mix,)
    reports = [run(args, mix) for mix in mixes]
    print(json.dumps(reports, indent=1))
    command = "python benchmarks/load_test.py" + "".join(f" {a}" for a in sys.argv[1:])
    section = markdown(reports, command)
    print(section)
    if args.write is not None:
        replace_section(args.write, SECTION, section)
        print(f"wrote the section to {args.write}")
    ratio = p95_ratio(reports)
    failed = any(r["server_errors"] > 0 or r["unexpected"] > 0 or r["in_server_after"] != 0 or not r["within_rss_bound"]
                 for r in reports) or (ratio is not None and ratio > 2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
