"""The asyncio front of one `ContinuousEngine`: what a tier replica holds.

    event loop (requests)  --Submit / Cancel / Score-->  EngineLoop: step(), step(), ...
                           <--tokens, completions, scores (per request) and the engine's load--

The engine is not thread-safe, so one `EngineLoop` owns it: it applies the submissions and cancellations it is handed
through its inbox, calls `step()` while there is work and sleeps on the inbox otherwise. Every request routed to the
replica shares those steps, whatever its r, exit rule or sampling settings, and joins or leaves at any step. A request
the engine cannot queue (its waiting queue is full) fails at once with a 503 `RequestError` carrying Retry-After; a
stream whose consumer went away is cancelled and frees its row at the next step.

The loop runs on a thread of this process (`ReplicaBatcher(engine)`) or in a child process of its own
(`ReplicaBatcher.from_spec(spec, process=True)`, serve.engine_process). A replica's event loop and Ray's threads take
the GIL for every request and stream chunk, and each time they do an engine thread in the same process waits; in its
own process the engine shares no GIL. The front only sees a `Link`, so both behave alike. Nothing here imports Ray,
so the tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from recursive_model.batching import ContinuousEngine, QueueFull, StepEvent

from .affinity import pin_current_thread, thread_cpus
from .generation import Completion, GenerationRequest, StreamChunk, TokenDecoder, find_stop
from .router import RequestError
from .scoring import ScoreRequest, TokenScores, score_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load, published by the engine loop after its steps (and when it goes idle)."""

    running: int = 0  # sequences admitted (prefilling or decoding)
    waiting: int = 0  # requests queued for admission
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    tokens_generated: int = 0  # since start (stop tokens included)
    recurrences: float = 0.0  # spent on those tokens, since start
    steps: int = 0  # engine steps run
    busy_s: float = 0.0  # time spent in step(); busy_s / wall time = how much of the time the model computes
    busy_cpu_s: float = 0.0  # the engine thread's own CPU time in step(); below busy_s while it waits (core, GIL)
    rejected: int = 0  # requests refused because the waiting queue was full
    scored_tokens: int = 0  # tokens scored by full forwards (`ReplicaBatcher.score`), since start
    scored_recurrences: int = 0  # recurrences of those forwards, per token


@dataclass(frozen=True)
class EngineLimits:
    """What the front checks before a request reaches the engine (so the error can name the request's field)."""

    sequence_len: int
    max_recur: int
    is_recursive: bool
    kv_blocks: int
    kv_block_size: int

    @classmethod
    def of(cls, engine: ContinuousEngine) -> EngineLimits:
        pool = engine.pool
        return cls(
            engine.config.sequence_len, engine.max_recur, engine.config.is_recursive, pool.num_blocks, pool.block_size
        )


@dataclass(frozen=True)
class EngineSpec:
    """How to build and run a replica's engine. For a child process it is pickled there, so `factory` must be
    importable by name: a module-level function, or a functools.partial of one with picklable arguments."""

    factory: Callable[[], ContinuousEngine]
    torch_threads: int = 1  # intra-op threads of the engine
    engine_cpus: frozenset[int] | None = None  # the engine thread's CPUs (None: anywhere)
    retry_after_s: int = 1  # of the 503 a full or stopped engine answers
    stream_chunks_per_s: float | None = None  # see EngineLoop
    start_timeout_s: float = 600.0  # a child process that has not loaded its engine by then is given up


class MetricsSink(Protocol):
    """What the batcher reports; `serve.metrics.TierMetrics` sends it to Ray's metrics. Called on the thread that
    receives the engine loop's output (its own thread, or the reader of its process)."""

    def engine_load(self, snapshot: EngineSnapshot, tokens_per_s: float, mean_recur: float) -> None: ...
    def request_finished(self, completion: Completion) -> None: ...
    def tokens_scored(self, tokens: int, num_recur: int) -> None: ...  # called on the event loop


# --------------------------------------------------------------------------- what crosses to the engine loop and back
@dataclass(frozen=True)
class Submit:
    job_id: int
    req: GenerationRequest
    streaming: bool  # False: only the Completion is delivered, no per-token work
    min_interval_s: float  # streaming: this request's own floor between chunks
    arrived: float  # time.perf_counter() at the front (CLOCK_MONOTONIC: one clock for all processes of a machine)


@dataclass(frozen=True)
class Cancel:
    job_id: int


@dataclass(frozen=True)
class Score:
    job_id: int
    req: ScoreRequest


@dataclass(frozen=True)
class Failed:
    exc: BaseException


Event = StreamChunk | Completion | TokenScores | Failed
Outputs = list[tuple[int, list[Event]]]  # (job id, its events in order), for the jobs that have news
OutputSink = Callable[[Outputs, "EngineSnapshot | None", bool], None]  # (outputs, snapshot or None, engine idle)


def unavailable(error: BaseException, retry_after_s: int) -> RequestError:
    """The 503 of a request that an engine which stopped (for `error`) will never answer."""
    return RequestError(
        None,
        f"this replica's engine stopped ({type(error).__name__}: {error}); retry",
        status=503,
        code="service_unavailable",
        retry_after_s=retry_after_s,
    )


class _EngineJob:
    """A request in the engine loop: its tokens, text and what of them has been sent."""

    def __init__(self, sub: Submit, tokenizer: Any):
        self.job_id = sub.job_id
        self.req = sub.req
        self.streaming = sub.streaming
        self.min_interval_s = sub.min_interval_s
        self.arrived = sub.arrived
        self.next_chunk_at = 0.0  # perf_counter time before which new tokens are held (merged)
        self.decoder = TokenDecoder(tokenizer)
        self.first_token_s: float | None = None
        self.seq_id: int | None = None
        self.tokens: list[int] = []
        self.recurs: list[int] = []
        self.pieces: list[str] = []
        self.emitted = 0  # tokens already sent as StreamChunks (a possible stop string holds the rest back)
        self.text_len = 0  # len("".join(pieces))
        self.stop_token: int | None = None
        self.cut = False  # a stop string ended the completion: what the decoder still holds came after it


class EngineLoop:
    """The engine's owner: `run()` on one thread applies the inbox (`put` from any thread) and steps the engine,
    handing each step's news to `output`. Scoring forwards run on a thread of their own, one at a time: they only
    read the weights, so they never race the step, and a burst of them takes one core rather than all of them.

    `stream_chunks_per_s`: the replica's budget of stream chunks per second, shared by the streams open at the time:
    each stream's chunks come at most every max(min_interval_s, open streams / stream_chunks_per_s) seconds. Every
    chunk costs milliseconds of CPU on each process it crosses (replica, ingress, proxy), so under load chunks merge
    more tokens instead of that cost growing with the number of streams; alone, a stream keeps its min_interval_s.
    """

    def __init__(
        self, engine: ContinuousEngine, output: OutputSink, retry_after_s: int, stream_chunks_per_s: float | None
    ):
        if stream_chunks_per_s is not None and stream_chunks_per_s <= 0:
            raise ValueError(f"stream_chunks_per_s={stream_chunks_per_s}; must be > 0 (or None: no budget)")
        self.engine = engine
        self.output = output
        self.retry_after_s = retry_after_s
        self.stream_chunks_per_s = stream_chunks_per_s
        self._inbox: queue.SimpleQueue[Submit | Cancel | Score | None] = queue.SimpleQueue()
        self._jobs: dict[int, _EngineJob] = {}  # seq_id -> job
        self._by_id: dict[int, _EngineJob] = {}  # job id -> job
        self._streams = 0  # streaming jobs held now
        self._steps = 0
        self._busy_s = 0.0
        self._busy_cpu_s = 0.0
        self._rejected = 0
        self._scores: queue.SimpleQueue[Score | None] = queue.SimpleQueue()
        # Started here, on the caller's thread, so that it keeps the caller's CPUs when `run` pins its own thread.
        self._scorer = threading.Thread(target=self._score_loop, name="score", daemon=True)
        self._scorer.start()

    def put(self, item: Submit | Cancel | Score | None) -> None:
        """Hand the loop an item; None stops it."""
        self._inbox.put(item)

    def run(self, cpus: frozenset[int] | None = None) -> BaseException:
        """Serve until `put(None)` or a failed step; returns why it stopped. Pins this thread to `cpus` first."""
        try:
            if cpus is not None:
                pin_current_thread(cpus)
            while True:
                items, closed = self._take_inbox(block=not self.engine.has_work)
                if closed:
                    break
                for item in items:
                    self._apply(item)
                if self.engine.has_work:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    events = self.engine.step()
                    self._busy_s += time.perf_counter() - t0
                    self._busy_cpu_s += time.thread_time() - c0
                    self._steps += 1
                    out = self._dispatch(events)
                else:
                    out = []
                self.output(out, self._snapshot(), not self.engine.has_work)
            error: BaseException = RuntimeError("the replica is shutting down")
        except Exception as exc:  # a failed step leaves the engine in an unknown state: stop, let Serve replace us
            logger.exception("engine step failed; this replica stops serving")
            error = exc
        self._scores.put(None)
        return error

    # ------------------------------------------------------------------------------------------------ inbox
    def _take_inbox(self, block: bool) -> tuple[list[Submit | Cancel | Score], bool]:
        """Everything queued in the inbox (waiting for the first item when `block`), and whether None came."""
        items: list[Submit | Cancel | Score | None] = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [i for i in items if i is not None], None in items

    def _apply(self, item: Submit | Cancel | Score) -> None:
        if isinstance(item, Score):
            self._scores.put(item)
            return
        if isinstance(item, Cancel):
            job = self._by_id.get(item.job_id)
            if job is not None and job.seq_id is not None:
                self.engine.cancel(job.seq_id)
            return
        job, req = _EngineJob(item, self.engine.tokenizer), item.req
        try:
            job.seq_id = self.engine.submit(list(req.prompt), req.sampling, req.decode)
        except QueueFull as exc:
            self._rejected += 1
            err = RequestError(
                None,
                f"the replica is full ({exc}); retry after {self.retry_after_s}s",
                status=503,
                code="service_unavailable",
                retry_after_s=self.retry_after_s,
            )
            self.output([(job.job_id, [Failed(err)])], None, False)
            return
        except ValueError as exc:  # RequestTooLarge and others: the front refuses them earlier; a backstop
            self.output([(job.job_id, [Failed(RequestError(None, str(exc)))])], None, False)
            return
        self._jobs[job.seq_id] = job
        self._by_id[job.job_id] = job
        self._streams += job.streaming

    def _score_loop(self) -> None:
        while (item := self._scores.get()) is not None:
            try:
                result: Event = score_tokens(self.engine.model, item.req)
            except Exception as exc:  # the request's error, not the replica's
                result = Failed(exc)
            self.output([(item.job_id, [result])], None, False)

    # ------------------------------------------------------------------------------------------------ steps
    def _chunk_interval(self, min_interval_s: float) -> float:
        """Seconds between a stream's chunks now: its own floor, or its share of the replica's chunk budget."""
        if self.stream_chunks_per_s is None:
            return min_interval_s
        return max(min_interval_s, self._streams / self.stream_chunks_per_s)

    def _dispatch(self, events: list[StepEvent]) -> Outputs:
        out: Outputs = []
        stop_ids = self.engine.stop_ids
        now = time.perf_counter()
        for ev in events:
            job = self._jobs.get(ev.seq_id)
            if job is None:
                continue
            msgs: list[Event] = []
            if ev.step is not None and job.first_token_s is None:
                job.first_token_s = now - job.arrived
            # The stop token ends the turn; like Engine.generate_batch, it is not part of the completion.
            stopped = False
            if ev.step is not None and ev.finish_reason == "stop" and ev.step.token in stop_ids:
                job.stop_token = ev.step.token
            elif ev.step is not None:
                piece = job.decoder.piece(ev.step.token)
                job.tokens.append(ev.step.token)
                job.recurs.append(ev.step.num_recur)
                job.pieces.append(piece)
                job.text_len += len(piece)
                stopped = _match_stop(job, len(piece))
                if job.streaming and not (stopped or ev.finished) and now >= job.next_chunk_at:
                    msgs = _release(job, final=False)  # empty while the text is held: retried next step
                    if msgs:
                        job.next_chunk_at = now + self._chunk_interval(job.min_interval_s)
            if stopped and not ev.finished:  # a stop string: the engine row is freed at the next step
                self.engine.cancel(ev.seq_id)
            if ev.finished or stopped:
                del self._jobs[ev.seq_id], self._by_id[job.job_id]
                self._streams -= job.streaming
                if ev.finish_reason != "cancelled" or stopped:
                    msgs += _finish(job, "stop" if stopped else ev.finish_reason or "length")
            if msgs:
                out.append((job.job_id, msgs))
        return out

    def _snapshot(self) -> EngineSnapshot:
        s = self.engine.stats()
        return EngineSnapshot(
            running=int(s["running"]),
            waiting=int(s["waiting"]),
            kv_blocks_used=int(s["kv_blocks_used"]),
            kv_blocks_total=int(s["kv_blocks_total"]),
            tokens_generated=int(s["tokens_generated"]),
            recurrences=s["mean_recur"] * s["tokens_generated"],
            steps=self._steps,
            busy_s=self._busy_s,
            busy_cpu_s=self._busy_cpu_s,
            rejected=self._rejected,
        )


def _match_stop(job: _EngineJob, new_chars: int) -> bool:
    """Cut the completion before the first stop string, if the newest token completed one."""
    stop = job.req.stop
    if not stop:
        return False
    text = "".join(job.pieces)
    at, _ = find_stop(text, stop, max(0, len(text) - new_chars - max(map(len, stop)) + 1))
    if at is None:
        return False
    start = 0  # keep the tokens that begin before the stop string; the last one loses its end
    for i, piece in enumerate(job.pieces):
        if start + len(piece) >= at:
            del job.tokens[i + 1 :], job.recurs[i + 1 :], job.pieces[i + 1 :]
            job.pieces[i] = piece[: at - start]
            break
        start += len(piece)
    job.text_len = at
    job.cut = True
    return True


def _release(job: _EngineJob, final: bool) -> list[Event]:
    """The StreamChunk of tokens whose text is final: it can no longer turn into a stop string, and the last token
    waits while it ends inside a character (at the end, the U+FFFD of an unfinished character is its text)."""
    upto = len(job.tokens) - (not final and job.decoder.pending)
    if not final and job.req.stop:
        _, hold = find_stop("".join(job.pieces), job.req.stop, len("".join(job.pieces)))
        end = 0
        for i, piece in enumerate(job.pieces):
            end += len(piece)
            if end > job.text_len - hold:
                upto = min(upto, i)
                break
    if upto <= job.emitted:
        return []
    sl = slice(job.emitted, upto)
    job.emitted = upto
    return [StreamChunk(job.tokens[sl], job.recurs[sl], job.pieces[sl])]


def _finish(job: _EngineJob, reason: str) -> list[Event]:
    tail = job.decoder.flush()  # bytes of an unfinished character at the very end: U+FFFD, the last token's text
    if tail and not job.cut and job.pieces:
        job.pieces[-1] += tail
        job.text_len += len(tail)
    msgs: list[Event] = _release(job, final=True) if job.streaming else []
    done = Completion(
        reason,
        len(job.req.prompt),
        len(job.tokens),
        list(job.recurs),
        "".join(job.pieces),
        job.first_token_s or 0.0,
        list(job.tokens),
        job.stop_token,
    )
    return [*msgs, done]


# ------------------------------------------------------------------------------------------------------- links
class Link(Protocol):
    """Where the front's items go: an EngineLoop on a thread (`ThreadLink`) or in a child process
    (serve.engine_process.ProcessLink). Its output and its stop reach the front through the callbacks it was given."""

    def put(self, item: Submit | Cancel | Score) -> None: ...
    def close(self) -> None: ...
    def alive(self) -> bool: ...
    def engine_cpus(self) -> frozenset[int]: ...


class ThreadLink:
    """An EngineLoop on a thread of this process."""

    def __init__(self, loop: EngineLoop, cpus: frozenset[int] | None, on_stop: Callable[[BaseException], None]):
        self.loop = loop
        self._thread = threading.Thread(target=lambda: on_stop(loop.run(cpus)), name="engine", daemon=True)
        self._thread.start()

    def put(self, item: Submit | Cancel | Score) -> None:
        self.loop.put(item)

    def close(self) -> None:
        self.loop.put(None)
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def engine_cpus(self) -> frozenset[int]:
        return thread_cpus(self._thread)


# ------------------------------------------------------------------------------------------------------- front
class _Job:
    """A request in flight, on the front: the queue its event loop reads."""

    def __init__(self, job_id: int, loop: asyncio.AbstractEventLoop):
        self.job_id = job_id
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False  # event loop: the Completion, the scores or a failure is queued
        self.done = False  # set by the consumer side once it stops reading (finished, failed or went away)


class ReplicaBatcher:
    """Continuous batching for one replica: `stream` / `generate` / `score` from one or more event loops, one engine.

    `ReplicaBatcher(engine, ...)` runs the engine loop on a thread of this process; `ReplicaBatcher.from_spec(spec,
    process=True)` in a child process (serve.engine_process). `stats_interval_s`: how often (at most) the engine's
    load goes to the metrics sink while it is busy. `stream_chunks_per_s`: see EngineLoop. `engine_cpus`: the CPUs the
    engine thread (and the torch threads it starts) runs on; None = anywhere (see serve.affinity; check them with
    `resolve_cpus` first).
    """

    def __init__(
        self,
        engine: ContinuousEngine,
        metrics: MetricsSink | None = None,
        retry_after_s: int = 1,
        stats_interval_s: float = 0.5,
        stream_chunks_per_s: float | None = None,
        engine_cpus: frozenset[int] | None = None,
    ):
        self._front(EngineLimits.of(engine), metrics, retry_after_s, stats_interval_s)
        loop = EngineLoop(engine, self._on_output, retry_after_s, stream_chunks_per_s)
        self._link: Link = ThreadLink(loop, engine_cpus, self._on_stop)

    @classmethod
    def from_spec(
        cls, spec: EngineSpec, metrics: MetricsSink | None = None, *, process: bool, stats_interval_s: float = 0.5
    ) -> ReplicaBatcher:
        """Build the engine from `spec` and run its loop in a child process (`process`, serve.engine_process: this
        returns once the child's engine is loaded, raising what failed there) or on a thread of this process."""
        if not process:
            import torch

            torch.set_num_threads(spec.torch_threads)
            engine, chunks = spec.factory(), spec.stream_chunks_per_s
            return cls(engine, metrics, spec.retry_after_s, stats_interval_s, chunks, spec.engine_cpus)
        from .engine_process import ProcessLink

        self = cls.__new__(cls)
        link = ProcessLink(spec, self._on_output, self._on_stop)  # called only once it reads (below)
        self._front(link.limits, metrics, spec.retry_after_s, stats_interval_s)
        self._link = link
        link.start_reading()
        return self

    def _front(
        self, limits: EngineLimits, metrics: MetricsSink | None, retry_after_s: int, stats_interval_s: float
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.stats_interval_s = stats_interval_s
        self._lock = threading.Lock()  # orders "has the engine stopped" against registering a job
        self._error: BaseException | None = None  # why the engine loop stopped
        self._jobs: dict[int, _Job] = {}  # open jobs by id (guarded by _lock)
        self._next_id = 0
        self._snapshot = EngineSnapshot(kv_blocks_total=limits.kv_blocks)
        self._reported = (time.perf_counter(), 0, 0.0)  # (when, tokens, recurrences) of the last metrics report
        self._scored = (0, 0)  # (tokens, recurrences) scored, updated on the event loop

    # ------------------------------------------------------------------------------------------------ public
    def stats(self) -> EngineSnapshot:
        """The engine's load after its latest reported step, and what the scoring forwards computed."""
        tokens, recurrences = self._scored
        return dataclasses.replace(self._snapshot, scored_tokens=tokens, scored_recurrences=recurrences)

    async def score(self, req: ScoreRequest) -> TokenScores:
        """Log-probabilities of `req.ids` from one full forward at `req.num_recur` (see serve.scoring)."""
        lim = self.limits
        if not req.ids:
            raise RequestError("prompt", "the prompt is empty")
        if len(req.ids) > lim.sequence_len:
            raise RequestError(
                "prompt",
                f"prompt + completion are {len(req.ids)} tokens; the model's context is {lim.sequence_len} tokens",
                code="context_length_exceeded",
            )
        if lim.is_recursive and req.num_recur > lim.max_recur:
            raise RequestError("max_recur", f"max_recur={req.num_recur} exceeds this replica's r_max={lim.max_recur}")
        job = self._open(lambda job_id: Score(job_id, req))
        try:
            result = await job.queue.get()
        finally:
            self._close_job(job)
        if isinstance(result, Failed):
            raise result.exc
        assert isinstance(result, TokenScores)
        tokens, recurrences = self._scored
        self._scored = (tokens + len(req.ids), recurrences + len(req.ids) * req.num_recur)
        if self.metrics is not None:
            self.metrics.tokens_scored(len(req.ids), req.num_recur)
        return result

    def engine_cpus(self) -> frozenset[int]:
        """The CPUs the engine thread may run on now."""
        return self._link.engine_cpus()

    def healthy(self) -> bool:
        """False once the engine loop stopped (the replica should then be replaced)."""
        return self._error is None and self._link.alive()

    async def stream(
        self, req: GenerationRequest, min_interval_s: float = 0.0, *, tokens: bool = True
    ) -> AsyncIterator[StreamChunk | Completion]:
        """Yield StreamChunks as tokens are generated, then one Completion. Raises RequestError for a request that
        cannot run (400, naming the field) or cannot be queued now (503 with `retry_after_s`).

        The first chunk comes as soon as the first token exists; later chunks at most every `min_interval_s`, or
        less often while other streams share the replica's `stream_chunks_per_s` (tokens in between are merged),
        which bounds the messaging cost when the stream crosses processes. The engine loop holds the tokens until
        a chunk is due, so the event loop wakes once per chunk, not once per token (its wake-ups take the GIL from
        an engine thread in this process).
        With `tokens=False` only the Completion comes (no per-token work at all).
        """
        async with contextlib.aclosing(self.stream_batches(req, min_interval_s, tokens=tokens)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def stream_batches(
        self, req: GenerationRequest, min_interval_s: float = 0.0, *, tokens: bool = True
    ) -> AsyncIterator[list[StreamChunk | Completion]]:
        """`stream`'s events, grouped as they reach the consumer: each item is one StreamChunk, the Completion, or
        the last StreamChunk and the Completion together. Across processes every item is a message, so a stream's
        end costs one message, not two."""
        self._check(req)
        now = time.perf_counter()
        job = self._open(lambda job_id: Submit(job_id, req, tokens, min_interval_s, now))
        try:
            while True:
                events = [await job.queue.get()]
                while not job.queue.empty():
                    events.append(job.queue.get_nowait())
                chunk, end = _merge(events)
                batch: list[StreamChunk | Completion] = [chunk] if chunk.pieces else []
                if end is not None:
                    yield [*batch, end]
                    return
                if batch:
                    yield batch
        finally:
            if not job.finished:
                self._put(Cancel(job.job_id))  # the consumer went away: free its row at the next step
            self._close_job(job)

    async def generate(self, req: GenerationRequest) -> Completion:
        """Run one request to the end; the Completion carries the text."""
        async with contextlib.aclosing(self.stream_batches(req, tokens=False)) as batches:
            async for batch in batches:
                if isinstance(batch[-1], Completion):
                    return batch[-1]
        raise AssertionError("a request's stream ended without its Completion")

    def close(self) -> None:
        """Stop the engine loop; requests still in flight fail with 503."""
        self._link.close()

    # ----------------------------------------------------------------------------------------- event-loop side
    def _check(self, req: GenerationRequest) -> None:
        """What can be refused before the request reaches the engine, with the request field to blame."""
        lim = self.limits
        n = len(req.prompt)
        if n == 0:
            raise RequestError("messages", "the prompt is empty")
        if n >= lim.sequence_len:
            raise RequestError(
                "messages",
                f"the prompt is {n} tokens; the model's context is {lim.sequence_len} tokens",
                code="context_length_exceeded",
            )
        if lim.is_recursive and req.decode.num_recur > lim.max_recur:
            raise RequestError(
                "max_recur", f"max_recur={req.decode.num_recur} exceeds this replica's r_max={lim.max_recur}"
            )
        reserve = min(lim.sequence_len, n + req.sampling.max_tokens)
        if -(-reserve // lim.kv_block_size) > lim.kv_blocks:
            raise RequestError(
                "max_tokens",
                f"prompt ({n} tokens) + max_tokens ({req.sampling.max_tokens}) exceed this replica's KV pool of "
                f"{lim.kv_blocks * lim.kv_block_size} tokens",
            )

    def _open(self, item: Callable[[int], Submit | Score]) -> _Job:
        """Register a job and hand the engine loop its item; a stopped engine refuses it with 503."""
        with self._lock:
            if self._error is not None:
                raise unavailable(self._error, self.retry_after_s)
            self._next_id += 1
            job = _Job(self._next_id, asyncio.get_running_loop())
            self._jobs[job.job_id] = job
            self._link.put(item(job.job_id))
        return job

    def _put(self, item: Cancel) -> None:
        with self._lock:
            if self._error is None:
                self._link.put(item)

    def _close_job(self, job: _Job) -> None:
        job.done = True
        with self._lock:
            self._jobs.pop(job.job_id, None)

    # --------------------------------------------------------------------- the engine loop's side (any thread)
    def _on_output(self, outputs: Outputs, snapshot: EngineSnapshot | None, idle: bool) -> None:
        if snapshot is not None:
            self._snapshot = snapshot
            self._report(snapshot, idle)
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, list[Event]]]] = {}
        with self._lock:
            for job_id, events in outputs:
                job = self._jobs.get(job_id)
                if job is not None:
                    by_loop.setdefault(job.loop, []).append((job, events))
        if self.metrics is not None:
            for _, events in outputs:
                for ev in events:
                    if isinstance(ev, Completion):
                        self.metrics.request_finished(ev)
        self._send(by_loop)

    def _on_stop(self, error: BaseException) -> None:
        """The engine loop is gone: refuse from now on and fail every job still open."""
        with self._lock:
            if self._error is None:
                self._error = error
            failed = Failed(unavailable(self._error, self.retry_after_s))
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, list[Event]]]] = {}
            for job in self._jobs.values():
                by_loop.setdefault(job.loop, []).append((job, [failed]))
        self._send(by_loop)

    def _send(self, by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, list[Event]]]]) -> None:
        """Hand events to each job's event loop (one callback per loop)."""
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # that loop is closed: its requests have no reader left
                pass

    @staticmethod
    def _deliver(items: list[tuple[_Job, list[Event]]]) -> None:
        for job, events in items:
            if job.done or job.finished:
                continue  # nobody reads this queue any more, or its end is already there
            for ev in events:
                job.queue.put_nowait(ev)
                if isinstance(ev, Completion | TokenScores | Failed):
                    job.finished = True
                    break

    def _report(self, snap: EngineSnapshot, idle: bool) -> None:
        now = time.perf_counter()
        when, tokens, recurrences = self._reported
        if self.metrics is None or (not idle and now - when < self.stats_interval_s):
            return
        new_tokens = snap.tokens_generated - tokens
        mean_recur = (snap.recurrences - recurrences) / new_tokens if new_tokens else 0.0
        self.metrics.engine_load(snap, new_tokens / max(now - when, 1e-9), mean_recur)
        self._reported = (now, snap.tokens_generated, snap.recurrences)


def _merge(events: list[Event]) -> tuple[StreamChunk, Completion | None]:
    """The events queued for one request since its consumer last looked, as one chunk (and the end, if it came)."""
    chunk = StreamChunk([], [], [])
    end: Completion | None = None
    for ev in events:
        if isinstance(ev, Failed):
            raise ev.exc
        if isinstance(ev, Completion):
            end = ev
        elif isinstance(ev, StreamChunk):
            chunk.tokens += ev.tokens
            chunk.recurs += ev.recurs
            chunk.pieces += ev.pieces
    return chunk, end
