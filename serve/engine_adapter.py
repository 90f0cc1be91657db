"""Async batching over the synchronous `Engine`: concurrent requests of one replica decode in one batch.

`BatchingEngine` is what a tier replica holds. Requests queue up; a scheduler task forms a batch of requests that can
share one `Engine.generate` call (same r, KV strategy, exit settings and sampling settings: the Engine takes them per
call) and runs it in a dedicated thread, so the replica's event loop keeps accepting requests and streaming tokens
while the model computes. Each generated token is decoded to text incrementally (multi-byte characters split across
tokens are held back until complete) and reported with the recurrences that produced it.

Why our own queue rather than `@serve.batch`: the Engine is a blocking generator with per-call settings (so only
requests with equal settings can share a call), a batch must not mix prompts whose lengths would cut a batch mate
short at the end of the context, and a batch whose clients all went away should stop computing. Nothing here imports
Ray, so the tests drive it directly.

The Engine cannot add rows to a running `generate` call, so batches are static: requests arriving mid-batch wait for
the next one (see `_schedule` for how long a new batch waits to fill up).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from recursive_model.engine import Engine

from .router import RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: prompt ids plus the settings the Engine takes per call."""

    prompt: tuple[int, ...]
    max_tokens: int
    num_recur: int
    temperature: float = 1.0
    top_k: int | None = None
    kv_cache: str | None = None
    exit_criterion: str | None = None
    exit_threshold: float | None = None
    min_recur: int | None = None

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one Engine.generate call."""
        return (
            self.num_recur,
            self.kv_cache,
            self.exit_criterion,
            self.exit_threshold,
            self.min_recur,
            self.temperature,
            self.top_k,
        )


@dataclass
class StreamChunk:
    """Newly generated tokens of one request. `"".join(pieces) == text`; pieces[i] is token i's text."""

    tokens: list[int]
    recurs: list[int]  # recurrences spent on each token
    pieces: list[str]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class Completion:
    """The end of one request: why it stopped and what it cost."""

    finish_reason: str  # "stop" (the model ended its turn) or "length" (max_tokens or the context is full)
    prompt_tokens: int
    completion_tokens: int
    recurs: list[int] = field(default_factory=list)
    text: str = ""
    queue_s: float = 0.0  # time between arrival and the start of its batch
    batch_size: int = 1  # requests in the batch that generated it

    @property
    def mean_recur(self) -> float:
        return sum(self.recurs) / len(self.recurs) if self.recurs else 0.0


class MetricsSink(Protocol):
    """What the batcher reports; `serve.metrics.TierMetrics` sends it to Ray's metrics."""

    def queue_length(self, n: int) -> None: ...
    def batch_finished(self, size: int, tokens: int, seconds: float) -> None: ...
    def request_finished(self, completion: Completion) -> None: ...


class TokenDecoder:
    """Token ids -> text pieces, holding back the bytes of a character split across tokens."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.id_to_token(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Job:
    """A request in flight. Written by the engine thread (progress) and the event loop (cancelled)."""

    def __init__(self, req: GenerationRequest, tokenizer: Any, streaming: bool):
        self.req = req
        self.streaming = streaming  # False: only the Completion is delivered, no per-token wake-ups
        self.queue: asyncio.Queue[StreamChunk | Completion | _Failed] = asyncio.Queue()
        self.finished = asyncio.Event()  # set once the Completion (or failure) is queued
        self.decoder = TokenDecoder(tokenizer)
        self.arrived = time.perf_counter()
        self.tokens: list[int] = []
        self.recurs: list[int] = []
        self.pieces: list[str] = []
        self.done = False
        self.cancelled = False  # the consumer went away: stop spending compute on it

    def need(self, sequence_len: int) -> int:
        """Decode steps this job can use: its max_tokens, capped by the room its prompt leaves in the context."""
        return min(self.req.max_tokens, sequence_len - len(self.req.prompt))


class BatchingEngine:
    """Queue + batch scheduler + engine thread around one `Engine`. Use from one asyncio event loop."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.05,
        metrics: MetricsSink | None = None,
        batch_wait_fraction: float = 0.25,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.sequence_len: int = engine.config.sequence_len
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.batch_wait_fraction = batch_wait_fraction
        self._last_batch_s = 0.0
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._running = 0  # requests in the batch being decoded
        self._peak = 0  # most requests present (running + pending) since the current batch started
        self._wakeup: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        # One thread: the Engine is not thread-safe, and one batch at a time already uses the replica's cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.batches_run = 0  # batches started (a diagnostic: fewer batches than requests = batching works)
        self.requests_run = 0  # requests in those batches: requests_run / batches_run = mean batch size
        self.busy_s = 0.0  # time spent decoding; busy_s / wall time = how much of the time the model computes

    # ------------------------------------------------------------------------------------------------ public
    @property
    def queue_length(self) -> int:
        """Requests waiting for a batch (not counting the batch being decoded)."""
        return len(self._pending)

    def healthy(self) -> bool:
        """False once the scheduler task died (the replica should then be replaced)."""
        return self._scheduler is None or not self._scheduler.done()

    async def stream(
        self, req: GenerationRequest, min_interval_s: float = 0.0, *, tokens: bool = True
    ) -> AsyncIterator[StreamChunk | Completion]:
        """Yield StreamChunks as tokens are generated, then one Completion. Raises RequestError for a request that
        cannot run (e.g. prompt longer than the context).

        The first chunk comes as soon as the first token exists; later chunks at most every `min_interval_s`
        (tokens in between are merged), which bounds per-token messaging cost when the stream crosses processes.
        With `tokens=False` only the Completion comes (no per-token work at all).
        """
        job = self._submit(req, tokens)
        loop = asyncio.get_running_loop()
        last_yield: float | None = None
        try:
            while True:
                if last_yield is not None and min_interval_s > 0 and not job.finished.is_set():
                    left = last_yield + min_interval_s - loop.time()
                    if left > 0:
                        try:
                            await asyncio.wait_for(job.finished.wait(), left)
                        except TimeoutError:
                            pass
                events = [await job.queue.get()]
                while not job.queue.empty():
                    events.append(job.queue.get_nowait())
                chunk = StreamChunk([], [], [])
                end: Completion | None = None
                for ev in events:
                    if isinstance(ev, _Failed):
                        raise ev.exc
                    if isinstance(ev, Completion):
                        end = ev
                    elif not ev.tokens and chunk.pieces:
                        chunk.pieces[-1] += ev.text  # a trailing partial character belongs to the last token
                    else:
                        chunk.tokens += ev.tokens
                        chunk.recurs += ev.recurs
                        chunk.pieces += ev.pieces
                if chunk.pieces:
                    last_yield = loop.time()
                    yield chunk
                if end is not None:
                    yield end
                    return
        finally:
            job.cancelled = True
            if not job.done and job in self._pending:
                self._pending.remove(job)
                self._report_queue()

    async def generate(self, req: GenerationRequest) -> Completion:
        """Run one request to the end; the Completion carries the text."""
        end: Completion | None = None
        async for ev in self.stream(req, tokens=False):
            if isinstance(ev, Completion):
                end = ev
        assert end is not None
        return end

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------------------------------------- scheduling
    def _submit(self, req: GenerationRequest, streaming: bool) -> _Job:
        n = len(req.prompt)
        if n == 0:
            raise RequestError("messages", "the prompt is empty")
        if n >= self.sequence_len:
            raise RequestError(
                "messages", f"the prompt is {n} tokens; the model's context is {self.sequence_len} tokens"
            )
        if req.max_tokens < 1:
            raise RequestError("max_tokens", f"max_tokens={req.max_tokens} must be >= 1")
        if req.num_recur < 1:
            raise RequestError("max_recur", f"num_recur={req.num_recur} must be >= 1")
        if self._scheduler is None or self._scheduler.done():
            if self._scheduler is not None and not self._scheduler.cancelled() and self._scheduler.exception():
                logger.error("batch scheduler had died (%r); restarting it", self._scheduler.exception())
            self._wakeup = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="batch-scheduler")
        job = _Job(req, self.tokenizer, streaming)
        self._pending.append(job)
        self._peak = max(self._peak, self._running + len(self._pending))
        self._report_queue()
        assert self._wakeup is not None
        self._wakeup.set()
        return job

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._pending:
                idle_since = loop.time()
                self._wakeup.clear()
                await self._wakeup.wait()
                if loop.time() - idle_since > 10 * self.batch_wait_timeout_s:
                    self._peak = len(self._pending)  # old demand says nothing about this new burst
            # Clients of the batch that just finished come back a few ms apart (tens of ms through HTTP on a busy
            # machine); starting with whoever is back first splits one batch into two half batches for good
            # (measured: mean batch 4.4 of 8). So wait until as many requests are pending as were present during
            # the previous batch, at most batch_wait_timeout_s or batch_wait_fraction of that batch's decode time:
            # a step of 8 rows costs about what a step of 4 does, so a short wait buys up to twice the throughput.
            target = min(self.max_batch_size, max(1, self._peak))
            budget = max(self.batch_wait_timeout_s, self.batch_wait_fraction * self._last_batch_s)
            deadline = loop.time() + budget
            while len(self._pending) < target and (left := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            jobs = self._take_batch()
            if not jobs:
                continue
            self._report_queue()
            self.batches_run += 1
            self.requests_run += len(jobs)
            self._running = len(jobs)
            self._peak = self._running + len(self._pending)
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, jobs, loop)
            except Exception as exc:  # the executor itself failed; the jobs must not hang
                self._deliver([(j, [_Failed(exc)]) for j in jobs if not j.done])
            self._running = 0
            self._last_batch_s = time.perf_counter() - t0
            self.busy_s += self._last_batch_s
            if self.metrics is not None:
                self.metrics.batch_finished(len(jobs), sum(len(j.tokens) for j in jobs), self._last_batch_s)

    def _take_batch(self) -> list[_Job]:
        """The oldest job plus later jobs that can share its Engine call, in arrival order.

        Rows of one call stop when the longest prompt reaches the end of the context, so a job joins only if
        every member still gets all the steps it needs (no request is cut short by its batch mates)."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        key = self._pending[0].req.batch_key()
        batch: list[_Job] = []
        longest, max_need = 0, 0
        for job in list(self._pending):
            if len(batch) >= self.max_batch_size:
                break
            if job.cancelled or job.req.batch_key() != key:
                continue
            new_longest = max(longest, len(job.req.prompt))
            new_need = max(max_need, job.need(self.sequence_len))
            if batch and new_need > self.sequence_len - new_longest:
                continue
            batch.append(job)
            longest, max_need = new_longest, new_need
        for job in batch:
            self._pending.remove(job)
        return batch

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length(len(self._pending))

    # ------------------------------------------------------------------------------------ engine thread side
    def _run_batch(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        """Decode `jobs` together (engine thread). Progress reaches the event loop once per step."""
        started = time.perf_counter()
        req = jobs[0].req
        stop_ids = self.engine.stop_ids
        queue_s = [started - j.arrived for j in jobs]

        def finish(job: _Job, i: int, reason: str) -> list[Any]:
            job.done = True
            events: list[Any] = []
            tail = job.decoder.flush()  # bytes of an unfinished character at the very end: U+FFFD
            if tail:
                job.pieces.append(tail)
                if job.streaming:
                    events.append(StreamChunk([], [], [tail]))
            text = "".join(job.pieces)
            events.append(
                Completion(reason, len(job.req.prompt), len(job.tokens), list(job.recurs), text, queue_s[i], len(jobs))
            )
            return events

        try:
            steps = self.engine.generate(
                [list(j.req.prompt) for j in jobs],
                max_tokens=max(j.need(self.sequence_len) for j in jobs),
                temperature=req.temperature,
                top_k=req.top_k,
                seed=int(started * 1e6) % (2**31),  # fresh randomness per batch; requests do not share a stream
                num_recur=req.num_recur,
                kv_cache=req.kv_cache,
                exit_criterion=req.exit_criterion,
                exit_threshold=req.exit_threshold,
                min_recur=req.min_recur,
            )
            for step in steps:
                out: list[tuple[_Job, list[Any]]] = []
                for i, (job, ts) in enumerate(zip(jobs, step, strict=True)):
                    if job.done or ts is None:
                        continue
                    if ts.token in stop_ids:
                        out.append((job, finish(job, i, "stop")))
                        continue
                    piece = job.decoder.piece(ts.token)
                    job.tokens.append(ts.token)
                    job.recurs.append(ts.num_recur)
                    job.pieces.append(piece)
                    events: list[Any] = [StreamChunk([ts.token], [ts.num_recur], [piece])] if job.streaming else []
                    if len(job.tokens) >= job.req.max_tokens:
                        events += finish(job, i, "length")
                    if events:
                        out.append((job, events))
                if out:
                    loop.call_soon_threadsafe(self._deliver, out)
                if all(j.done or j.cancelled for j in jobs):
                    break  # closes the generator: no compute for rows nobody waits for
            out = [(j, finish(j, i, "length")) for i, j in enumerate(jobs) if not j.done]
            if out:
                loop.call_soon_threadsafe(self._deliver, out)
        except Exception as exc:
            logger.exception("batch of %d failed", len(jobs))
            failed = [(j, [_Failed(exc)]) for j in jobs if not j.done]
            for j in jobs:
                j.done = True
            loop.call_soon_threadsafe(self._deliver, failed)

    def _deliver(self, items: Sequence[tuple[_Job, list[Any]]]) -> None:
        for job, events in items:
            for ev in events:
                job.queue.put_nowait(ev)
                if isinstance(ev, Completion | _Failed):
                    job.finished.set()
                if isinstance(ev, Completion) and self.metrics is not None and not job.cancelled:
                    self.metrics.request_finished(ev)
