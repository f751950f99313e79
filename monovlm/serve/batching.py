"""One worker thread runs the model: it takes waiting requests from a bounded queue, groups compatible ones, and runs
one batched generation per group, streaming each row's text back to its request as it is decoded.

    submit(job) ──► waiting (deque, at most max_queue; full: QueueFull -> HTTP 429)
                        │  the oldest job leads; later jobs with the same batch key join it (up to max_batch)
                        ▼
              token_steps(model, left-padded prompts, images, reduction, strategy) ── one forward per step for
                        │                                                 the whole batch (+ the strategy's own)
              per row: stop ids, its own stop strings, its own max_tokens ──► Delta ... Finished  (job.sink)

Why rows may differ in max_tokens and stop strings but not in sampling settings: `token_steps` applies one sampler
to the whole batch, while stopping is decided here per row (a row that is done is simply no longer read; the batch
ends when every row is done). Greedy rows therefore give the same text batched as alone (tests check it against
`generate` one prompt at a time), and a seeded request runs alone so that its answer depends on its seed only. The
token reduction and decoding strategy (`methods.py`) are likewise one per batch: only requests that ask for the same
ones share a batch, and each batch gets a fresh Reduction (it records its last forward's trace).

The worker never lets one bad batch kill the thread: an unexpected error fails that batch's requests (a 500, since
every input error is caught before a job is queued) and the loop goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from monovlm.infer.generate import GenerationConfig, cut_at_stop, left_pad, safe_prefix, token_steps
from monovlm.serve.messages import GenerationOptions

log = logging.getLogger("monovlm.serve")


@dataclass
class Delta:
    text: str  # new answer text for the client


@dataclass
class Finished:
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_tokens)
    completion_tokens: int  # tokens generated, a final stop token included


@dataclass
class Failed:
    message: str  # a server-side failure (never caused by the request's content)


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """The waiting queue holds max_queue jobs already."""


class Job:
    """One request's generation: its prompt, images and settings, and where its events go.

    `sink` is called from the worker thread and must not block (the server hands events to its event loop). Every
    job the worker receives ends with exactly one Finished or Failed event — a cancelled one too (Failed) — so the
    server can count a request as gone when that event arrives."""

    def __init__(self, prompt: list[int], images: Sequence[torch.Tensor], options: GenerationOptions, max_tokens: int,
                 sink: Callable[[Event], None]) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        self.prompt = list(prompt)
        self.images = list(images)
        self.options = options
        self.max_tokens = max_tokens
        self.sink = sink
        self.cancelled = False  # set by the server when the client is gone; the worker then drops the row

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): nobody reads this row any more
            self.cancelled = True


class _Row:
    """The decoding state of one job inside a batch: its tokens, the text already sent, whether it is done.

    Text is held back while it could still become a stop string or ends in an incomplete UTF-8 character (as
    `stream_text` does), so the deltas add up to exactly what `generate` returns for the same tokens."""

    def __init__(self, job: Job, tokenizer, stop_ids: Sequence[int]) -> None:
        self.job = job
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.ids: list[int] = []
        self.shown = 0  # characters of text already sent
        self.done = False

    def push(self, token: int) -> None:
        self.ids.append(token)
        stops = self.job.options.stop
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if token in self.stop_ids or (stops and cut_at_stop(text, stops) != text):
            self.finish("stop", text)
            return
        safe = safe_prefix(text, stops)
        if len(safe) > self.shown:
            self.job.emit(Delta(safe[self.shown :]))
            self.shown = len(safe)
        if len(self.ids) >= self.job.max_tokens:
            self.finish("length", text)

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        final = cut_at_stop(text, self.job.options.stop)
        if len(final) > self.shown:
            self.job.emit(Delta(final[self.shown :]))
            self.shown = len(final)
        self.job.emit(Finished(reason, len(self.ids)))
        self.done = True


class BatchWorker:
    """A bounded queue of jobs and the thread that generates them in batches (see the module docstring)."""

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], pad_id: int = 0, max_batch: int = 16,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = tuple(stop_ids)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_sizes: Counter[int] = Counter()  # size -> how many batches of that size ran (bounded keys)
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the queue ----------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._stopping:
                raise RuntimeError("the batch worker is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._condition.notify()

    def queued(self) -> int:
        with self._condition:
            return len(self._waiting)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker between batches (jobs queue up meanwhile); tests use it to make requests arrive together."""
        with self._condition:
            self._paused = True
        try:
            yield
        finally:
            with self._condition:
                self._paused = False
                self._condition.notify_all()

    def take_batch(self, wait: bool = True) -> list[Job]:
        """Remove and return the next batch: the oldest live job and the later ones sharing its batch key."""
        with self._condition:
            while wait and not self._stopping and (self._paused or not self._waiting):
                self._condition.wait()
            if self._stopping or self._paused:
                return []
            batch: list[Job] = []
            kept: deque[Job] = deque()
            dropped: list[Job] = []
            key = None
            while self._waiting:
                job = self._waiting.popleft()
                if job.cancelled:
                    dropped.append(job)  # its client left before it started
                    continue
                if not batch:
                    batch.append(job)
                    key = job.options.batch_key()
                elif key is not None and len(batch) < self.max_batch and job.options.batch_key() == key:
                    batch.append(job)
                else:
                    kept.append(job)
            self._waiting = kept  # the others keep their order (the oldest of them leads the next batch)
        for job in dropped:
            job.emit(Failed("cancelled"))
        return batch

    # -- the thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._condition:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="monovlm-batch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the jobs still waiting, and end the thread."""
        with self._condition:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._condition.notify_all()
        for job in waiting:
            job.emit(Failed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            batch = self.take_batch()
            if not batch:
                with self._condition:
                    if self._stopping:
                        return
                continue
            self.run_batch(batch)

    # -- generation ---------------------------------------------------------------------------------------------

    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Generate for jobs that share a batch key; every job ends with Finished (or Failed), unless cancelled."""
        rows = [_Row(job, self.tokenizer, self.stop_ids) for job in jobs]
        self.batch_sizes[len(jobs)] += 1
        try:
            self._generate(rows)
        except Exception as error:  # a bug, not bad input (inputs are checked before queueing): fail this batch only
            log.exception("generation failed for a batch of %d", len(rows))
            for row in rows:
                if not row.done:
                    row.done = True
                    row.job.emit(Failed(f"generation failed: {type(error).__name__}: {error}"))

    @torch.inference_mode()
    def _generate(self, rows: list[_Row]) -> None:
        lead = rows[0].job.options
        config = GenerationConfig(max_new_tokens=max(row.job.max_tokens for row in rows), temperature=lead.temperature,
                                  top_k=lead.top_k, top_p=lead.top_p, stop_ids=self.stop_ids, seed=lead.seed)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad([row.job.prompt for row in rows], self.pad_id)  # (B, T) each
        images = [image.to(device) for row in rows for image in row.job.images]  # row-major: the scatter's order
        # the batch shares its key, so the lead's methods are every row's; a fresh Reduction / strategy per batch
        steps = token_steps(self.model, input_ids.to(device), attention_mask.to(device), config, pad_id=self.pad_id,
                            prefill_inputs=lead.methods.prefill_inputs(images), strategy=lead.methods.build_strategy())
        try:
            for tokens, _active in steps:  # a row that emitted a stop token is done here already
                for row, token in zip(rows, tokens.tolist()):
                    if row.done:
                        continue
                    if row.job.cancelled:
                        row.done = True
                        row.job.emit(Failed("cancelled"))
                    else:
                        row.push(token)
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:  # unreachable unless generation ended early; never leave a client waiting
            if not row.done:
                row.finish("length")
