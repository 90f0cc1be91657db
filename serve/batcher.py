"""The asyncio front of one `ContinuousEngine`: what a tier replica holds.

    event loop (requests)  --inbox-->  engine thread: submit / cancel, step(), step(), ...
                           <--call_soon_threadsafe--  tokens and completions, per request

The engine is not thread-safe, so one dedicated thread owns it: it applies the submissions and cancellations the event
loop hands it through a thread-safe inbox, calls `step()` while there is work and sleeps on the inbox otherwise.
Every request routed to the replica shares those steps, whatever its r, exit rule or sampling settings, and joins or
leaves at any step. A request the engine cannot queue (its waiting queue is full) fails at once with a 503
`RequestError` carrying Retry-After; a stream whose consumer went away is cancelled and frees its row at the next step.
Nothing here imports Ray, so the tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
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
    """The engine's load, published by the engine thread after each step (and when it goes idle)."""

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


class MetricsSink(Protocol):
    """What the batcher reports; `serve.metrics.TierMetrics` sends it to Ray's metrics. Called on the engine thread."""

    def engine_load(self, snapshot: EngineSnapshot, tokens_per_s: float, mean_recur: float) -> None: ...
    def request_finished(self, completion: Completion) -> None: ...
    def tokens_scored(self, tokens: int, num_recur: int) -> None: ...  # called on the event loop


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Job:
    """A request in flight. Its queue belongs to the event loop that submitted it; the rest to the engine thread."""

    def __init__(
        self,
        req: GenerationRequest,
        tokenizer: Any,
        streaming: bool,
        loop: asyncio.AbstractEventLoop,
        min_interval_s: float = 0.0,
    ):
        self.req = req
        self.streaming = streaming  # False: only the Completion is delivered, no per-token wake-ups
        self.min_interval_s = min_interval_s  # streaming: this request's own floor between chunks
        self.next_chunk_at = 0.0  # engine thread: perf_counter time before which new tokens are held (merged)
        self.loop = loop
        self.queue: asyncio.Queue[StreamChunk | Completion | _Failed] = asyncio.Queue()
        self.finished = False  # event loop: the Completion (or failure) is queued
        self.decoder = TokenDecoder(tokenizer)
        self.arrived = time.perf_counter()
        self.first_token_s: float | None = None
        self.seq_id: int | None = None
        self.tokens: list[int] = []
        self.recurs: list[int] = []
        self.pieces: list[str] = []
        self.emitted = 0  # tokens already sent as StreamChunks (a possible stop string holds the rest back)
        self.text_len = 0  # len("".join(pieces))
        self.stop_token: int | None = None
        self.cut = False  # a stop string ended the completion: what the decoder still holds came after it
        self.done = False  # set by the consumer side once it stops reading (finished, failed or went away)


class _Cancel:
    def __init__(self, job: _Job):
        self.job = job


class ReplicaBatcher:
    """Continuous batching for one replica: `stream` / `generate` from one or more event loops, one engine thread.

    `stats_interval_s`: how often (at most) the engine's load goes to the metrics sink while it is busy.
    `stream_chunks_per_s`: the replica's budget of stream chunks per second, shared by the streams open at the time:
    each stream's chunks come at most every max(min_interval_s, open streams / stream_chunks_per_s) seconds. Every
    chunk costs milliseconds of CPU on each process it crosses (replica, ingress, proxy), so under load chunks merge
    more tokens instead of that cost growing with the number of streams; alone, a stream keeps its min_interval_s.
    `engine_cpus`: the CPUs the engine thread (and the torch threads it starts) runs on; None = anywhere (see
    serve.affinity; check them with `resolve_cpus` first).
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
        if stream_chunks_per_s is not None and stream_chunks_per_s <= 0:
            raise ValueError(f"stream_chunks_per_s={stream_chunks_per_s}; must be > 0 (or None: no budget)")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.sequence_len: int = engine.config.sequence_len
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.stats_interval_s = stats_interval_s
        self.stream_chunks_per_s = stream_chunks_per_s
        self._open_streams = 0  # streams delivering tokens now (event-loop side; guarded by _lock)
        self._inbox: queue.SimpleQueue[_Job | _Cancel | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "is the engine thread alive" against putting into the inbox
        self._error: BaseException | None = None  # why the engine thread stopped
        self._jobs: dict[int, _Job] = {}  # engine thread only: seq_id -> job
        self._steps = 0
        self._busy_s = 0.0
        self._busy_cpu_s = 0.0
        self._rejected = 0
        self._snapshot = EngineSnapshot(kv_blocks_total=engine.pool.num_blocks)
        self._reported = (time.perf_counter(), 0, 0.0)  # (when, tokens, recurrences) of the last metrics report
        self._thread = threading.Thread(target=self._run, args=(engine_cpus,), name="engine", daemon=True)
        self._thread.start()
        # Scoring forwards run on their own thread, one at a time: they only read the weights, so they never race
        # the engine's step, and a burst of them takes one core rather than all of them.
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._scored = (0, 0)  # (tokens, recurrences) scored, updated on the event loop

    # ------------------------------------------------------------------------------------------------ public
    def stats(self) -> EngineSnapshot:
        """The engine's load after its latest step, and what the scoring forwards computed."""
        tokens, recurrences = self._scored
        return dataclasses.replace(self._snapshot, scored_tokens=tokens, scored_recurrences=recurrences)

    async def score(self, req: ScoreRequest) -> TokenScores:
        """Log-probabilities of `req.ids` from one full forward at `req.num_recur` (see serve.scoring)."""
        if not req.ids:
            raise RequestError("prompt", "the prompt is empty")
        if len(req.ids) > self.sequence_len:
            raise RequestError(
                "prompt",
                f"prompt + completion are {len(req.ids)} tokens; the model's context is {self.sequence_len} tokens",
                code="context_length_exceeded",
            )
        if self.engine.config.is_recursive and req.num_recur > self.engine.max_recur:
            raise RequestError(
                "max_recur", f"max_recur={req.num_recur} exceeds this replica's r_max={self.engine.max_recur}"
            )
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._scorer, score_tokens, self.engine.model, req)
        tokens, recurrences = self._scored
        self._scored = (tokens + len(req.ids), recurrences + len(req.ids) * req.num_recur)
        if self.metrics is not None:
            self.metrics.tokens_scored(len(req.ids), req.num_recur)
        return scores

    def engine_cpus(self) -> frozenset[int]:
        """The CPUs the engine thread may run on now."""
        return thread_cpus(self._thread)

    def healthy(self) -> bool:
        """False once the engine thread stopped (the replica should then be replaced)."""
        return self._error is None and self._thread.is_alive()

    async def stream(
        self, req: GenerationRequest, min_interval_s: float = 0.0, *, tokens: bool = True
    ) -> AsyncIterator[StreamChunk | Completion]:
        """Yield StreamChunks as tokens are generated, then one Completion. Raises RequestError for a request that
        cannot run (400, naming the field) or cannot be queued now (503 with `retry_after_s`).

        The first chunk comes as soon as the first token exists; later chunks at most every `min_interval_s`, or
        less often while other streams share the replica's `stream_chunks_per_s` (tokens in between are merged),
        which bounds the messaging cost when the stream crosses processes. The engine thread holds the tokens until
        a chunk is due, so the event loop wakes once per chunk, not once per token (its wake-ups take the GIL from
        the engine thread).
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
        job = _Job(req, self.tokenizer, tokens, asyncio.get_running_loop(), min_interval_s)
        if tokens:
            self._count_stream(+1)
        try:
            self._put(job)
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
            if tokens:
                self._count_stream(-1)
            if not job.finished:
                self._put(_Cancel(job), quiet=True)  # the consumer went away: free its row at the next step
            job.done = True

    async def generate(self, req: GenerationRequest) -> Completion:
        """Run one request to the end; the Completion carries the text."""
        async with contextlib.aclosing(self.stream_batches(req, tokens=False)) as batches:
            async for batch in batches:
                if isinstance(batch[-1], Completion):
                    return batch[-1]
        raise AssertionError("a request's stream ended without its Completion")

    def close(self) -> None:
        """Stop the engine thread; requests still in flight fail with 503."""
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self._scorer.shutdown(wait=False)

    # ----------------------------------------------------------------------------------------- event-loop side
    def _count_stream(self, delta: int) -> None:
        with self._lock:
            self._open_streams += delta

    def _chunk_interval(self, min_interval_s: float) -> float:
        """Seconds between a stream's chunks now: its own floor, or its share of the replica's chunk budget."""
        if self.stream_chunks_per_s is None:
            return min_interval_s
        return max(min_interval_s, self._open_streams / self.stream_chunks_per_s)

    def _check(self, req: GenerationRequest) -> None:
        """What can be refused before the request reaches the engine thread, with the request field to blame."""
        n = len(req.prompt)
        if n == 0:
            raise RequestError("messages", "the prompt is empty")
        if n >= self.sequence_len:
            raise RequestError(
                "messages",
                f"the prompt is {n} tokens; the model's context is {self.sequence_len} tokens",
                code="context_length_exceeded",
            )
        if self.engine.config.is_recursive and req.decode.num_recur > self.engine.max_recur:
            raise RequestError(
                "max_recur", f"max_recur={req.decode.num_recur} exceeds this replica's r_max={self.engine.max_recur}"
            )
        pool = self.engine.pool
        reserve = min(self.sequence_len, n + req.sampling.max_tokens)
        if pool.blocks_for(reserve) > pool.num_blocks:
            raise RequestError(
                "max_tokens",
                f"prompt ({n} tokens) + max_tokens ({req.sampling.max_tokens}) exceed this replica's KV pool of "
                f"{pool.num_blocks * pool.block_size} tokens",
            )

    def _put(self, item: _Job | _Cancel, quiet: bool = False) -> None:
        with self._lock:
            if self._error is None:
                self._inbox.put(item)
                return
        if not quiet:
            raise self._unavailable()

    def _unavailable(self) -> RequestError:
        return RequestError(
            None,
            f"this replica's engine stopped ({type(self._error).__name__}: {self._error}); retry",
            status=503,
            code="service_unavailable",
            retry_after_s=self.retry_after_s,
        )

    @staticmethod
    def _deliver(items: list[tuple[_Job, list[Any]]]) -> None:
        for job, events in items:
            if job.done:
                continue  # nobody reads this queue any more
            for ev in events:
                job.queue.put_nowait(ev)
                if isinstance(ev, Completion | _Failed):
                    job.finished = True

    # -------------------------------------------------------------------------------------- engine-thread side
    def _run(self, cpus: frozenset[int] | None) -> None:
        pending: list[_Job] = []  # submissions that arrived with the close: they still get an answer
        try:
            if cpus is not None:
                pin_current_thread(cpus)
            while True:
                items, closed = self._take_inbox(block=not self.engine.has_work)
                if closed:
                    pending = [i for i in items if isinstance(i, _Job)]
                    break
                for item in items:
                    self._apply(item)
                if self.engine.has_work:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    events = self.engine.step()
                    self._busy_s += time.perf_counter() - t0
                    self._busy_cpu_s += time.thread_time() - c0
                    self._steps += 1
                    self._dispatch(events)
                self._publish(idle=not self.engine.has_work)
            error: BaseException = RuntimeError("the replica is shutting down")
        except Exception as exc:  # a failed step leaves the engine in an unknown state: stop, let Serve replace us
            logger.exception("engine step failed; this replica stops serving")
            error = exc
        with self._lock:  # from here on `_put` refuses instead of queueing into an inbox nobody reads
            self._error = error
            leftover, _ = self._take_inbox(block=False)
        jobs = [*self._jobs.values(), *pending, *(i for i in leftover if isinstance(i, _Job))]
        self._jobs.clear()
        self._send([(j, [_Failed(self._unavailable())]) for j in jobs])

    def _take_inbox(self, block: bool) -> tuple[list[_Job | _Cancel], bool]:
        """Everything queued in the inbox (waiting for the first item when `block`), and whether close() came."""
        items: list[_Job | _Cancel | None] = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [i for i in items if i is not None], None in items

    def _apply(self, item: _Job | _Cancel) -> None:
        if isinstance(item, _Cancel):
            if item.job.seq_id is not None and item.job.seq_id in self._jobs:
                self.engine.cancel(item.job.seq_id)
            return
        job, req = item, item.req
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
            self._send([(job, [_Failed(err)])])
            return
        except ValueError as exc:  # RequestTooLarge and others: `_check` refuses them earlier; a backstop
            self._send([(job, [_Failed(RequestError(None, str(exc)))])])
            return
        self._jobs[job.seq_id] = job

    def _dispatch(self, events: list[StepEvent]) -> None:
        out: list[tuple[_Job, list[Any]]] = []
        stop_ids = self.engine.stop_ids
        now = time.perf_counter()
        for ev in events:
            job = self._jobs.get(ev.seq_id)
            if job is None:
                continue
            msgs: list[Any] = []
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
                stopped = self._match_stop(job, len(piece))
                if job.streaming and not (stopped or ev.finished) and now >= job.next_chunk_at:
                    msgs = self._release(job, final=False)  # empty while the text is held: retried next step
                    if msgs:
                        job.next_chunk_at = now + self._chunk_interval(job.min_interval_s)
            if stopped and not ev.finished:  # a stop string: the engine row is freed at the next step
                self.engine.cancel(ev.seq_id)
            if ev.finished or stopped:
                del self._jobs[ev.seq_id]
                if ev.finish_reason != "cancelled" or stopped:
                    msgs += self._finish(job, "stop" if stopped else ev.finish_reason or "length")
            if msgs:
                out.append((job, msgs))
        self._send(out)

    @staticmethod
    def _match_stop(job: _Job, new_chars: int) -> bool:
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

    @staticmethod
    def _release(job: _Job, final: bool) -> list[Any]:
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

    def _finish(self, job: _Job, reason: str) -> list[Any]:
        tail = job.decoder.flush()  # bytes of an unfinished character at the very end: U+FFFD, the last token's text
        if tail and not job.cut and job.pieces:
            job.pieces[-1] += tail
            job.text_len += len(tail)
        msgs: list[Any] = self._release(job, final=True) if job.streaming else []
        text = "".join(job.pieces)
        first = job.first_token_s or 0.0
        done = Completion(
            reason,
            len(job.req.prompt),
            len(job.tokens),
            list(job.recurs),
            text,
            first,
            list(job.tokens),
            job.stop_token,
        )
        if self.metrics is not None:
            self.metrics.request_finished(done)
        return [*msgs, done]

    def _send(self, items: list[tuple[_Job, list[Any]]]) -> None:
        """Hand events to each job's event loop (one callback per loop and step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, list[Any]]]] = {}
        for job, msgs in items:
            by_loop.setdefault(job.loop, []).append((job, msgs))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # that loop is closed: its requests have no reader left
                pass

    def _publish(self, idle: bool) -> None:
        s = self.engine.stats()
        snap = EngineSnapshot(
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
        self._snapshot = snap
        now = time.perf_counter()
        when, tokens, recurrences = self._reported
        if self.metrics is None or (not idle and now - when < self.stats_interval_s):
            return
        new_tokens = snap.tokens_generated - tokens
        mean_recur = (snap.recurrences - recurrences) / new_tokens if new_tokens else 0.0
        self.metrics.engine_load(snap, new_tokens / max(now - when, 1e-9), mean_recur)
        self._reported = (now, snap.tokens_generated, snap.recurrences)


def _merge(events: list[StreamChunk | Completion | _Failed]) -> tuple[StreamChunk, Completion | None]:
    """The events queued for one request since its consumer last looked, as one chunk (and the end, if it came)."""
    chunk = StreamChunk([], [], [])
    end: Completion | None = None
    for ev in events:
        if isinstance(ev, _Failed):
            raise ev.exc
        if isinstance(ev, Completion):
            end = ev
        else:
            chunk.tokens += ev.tokens
            chunk.recurs += ev.recurs
            chunk.pieces += ev.pieces
    return chunk, end
