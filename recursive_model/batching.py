"""Continuous batching for a recursive GPT: sequences join and leave at every step, each with its own settings.

`ContinuousEngine` holds the running sequences over one paged `KVPool`. Every `step()`:
1. retires finished and cancelled sequences, returning their KV blocks to the pool;
2. admits waiting requests while the pool has room for prompt + max_tokens, and runs prompt chunks of
   `prefill_chunk` tokens (at most `prefill_tokens_per_step` per step, so running rows are never stalled for long);
3. advances every running sequence by one token in ONE batched forward, in which each row runs its own budget and
   exit rule and only rows still recurring are computed (GPT.begin_rows -> recur_rows -> finish_rows). With
   `min_step_recur` a step ends once its shallowest row can finish: deeper rows' tokens (a `Flight`) carry over to
   the next step, so a cheap row's latency does not follow its deepest batch mate.

A sequence's result never depends on its batch mates: its chunk boundaries are fixed by its own prompt, its sampling
and its noise state come from its own seeded generators, and exited rows neither compute nor write.

Tool use (the calculator): between <|python_start|> and <|python_end|> the expression is collected; when it closes,
`<|output_start|>result<|output_end|>` is forced into the sequence (fed through the model like sampled tokens).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .calculator import CalculatorError, calculate
from .kv_cache import BatchKV, KVPool, PoolFull, SequenceKV
from .model import GPT, Flight
from .recurrence import DecodeSettings

NOISE_STREAM = 0x9E3779B97F4A7C15  # the noise generator of a row is seeded apart from its sampling generator


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How tokens are drawn for one sequence."""

    max_tokens: int = 64  # generated tokens at most (forced tool tokens included)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # sample among the k most likely tokens; None = all
    seed: int = 0  # the sequence's own generator: same seed, same tokens, whatever the batch

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens={self.max_tokens!r} is invalid; allowed an int >= 1")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature!r} is invalid; allowed a number >= 0 "
                             "(0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingParams.top_k={self.top_k!r} is invalid; allowed an int >= 1 or None")
        if not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed={self.seed!r} is invalid; allowed an int")


@dataclass
class TokenStep:
    """One generated token of one row."""

    token: int
    num_recur: int  # recurrences spent on the forward pass that produced this token
    forced: bool = False  # inserted by the calculator tool, not sampled


@dataclass
class StepEvent:
    """What one engine step produced for one sequence: a token, and whether the sequence is now finished."""

    seq_id: int
    step: TokenStep | None  # None when the sequence ended without a new token (cancelled)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (assistant_end/bos), "length", "cancelled"


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; the caller should retry later (HTTP 503 with Retry-After)."""


class RequestTooLarge(ValueError):
    """The request can never fit: prompt + max_tokens exceed the pool or the context."""


@dataclass
class _ToolState:
    """Tool-use bookkeeping of one sequence: forced tokens to emit and the expression being collected."""

    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    expr: list[int] = field(default_factory=list)


@dataclass
class _Sequence:
    seq_id: int
    prompt: list[int]
    sampling: SamplingParams
    decode: DecodeSettings
    kv: SequenceKV = field(default_factory=SequenceKV)
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    next_input: int | None = None  # fed at the next decode step: the last prompt token, then each emitted one
    state: torch.Tensor | None = None  # final state of the last token (warm start)
    flight: Flight | None = None  # the token (or prompt chunk) part-way through the recurrent block
    tools: _ToolState = field(default_factory=_ToolState)
    sampler: torch.Generator | None = None
    noise: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    meta: Any = None  # the caller's handle (e.g. an asyncio queue); the engine never reads it


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """(B, V) logits -> one token per row, each row with its own temperature, top-k and generator."""
    out = logits.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if p.temperature <= 0:
            continue
        row = logits[b].float() / p.temperature
        if p.top_k is not None and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1).cpu()
        out[b] = int(torch.multinomial(probs, 1, generator=generators[b]))
    return out


class ContinuousEngine:
    """A continuous-batching decoder over one model and one paged KV pool. Not thread-safe: one `step` at a time.

    kv_cache: the pool's strategy (every sequence of this engine uses it). max_recur: the largest budget a sequence may
    ask for (exact keeps a slot per recurrence). kv_tokens: pool size in tokens over all sequences.
    min_step_recur: None = a step runs every row's token to its end (the most tokens per step); k = a step runs at
    most max(k, smallest remaining budget in flight) recurrences and deeper tokens carry over (latency for cheap rows,
    more steps for deep ones; outputs are the same).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer,
        kv_cache: str | None = None,
        max_recur: int | None = None,
        kv_tokens: int | None = None,
        block_size: int = 16,
        max_running: int = 64,
        max_waiting: int | None = None,
        prefill_chunk: int = 128,
        prefill_tokens_per_step: int = 512,
        min_step_recur: int | None = None,
    ):
        cfg = model.config
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.kv_cache = kv_cache or cfg.decode.kv_cache
        self.max_recur = max_recur or max(cfg.decode.num_recur, cfg.recurrence.r_max)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        kv_tokens = kv_tokens or 8 * cfg.sequence_len
        self.pool = KVPool.for_tokens(cfg, kv_tokens, block_size=block_size, strategy=self.kv_cache,
                                      num_recur=self.max_recur, device=self.device, dtype=self.dtype)
        for name, v in (("max_running", max_running), ("prefill_chunk", prefill_chunk),
                        ("prefill_tokens_per_step", prefill_tokens_per_step)):
            if v < 1:
                raise ValueError(f"ContinuousEngine.{name}={v} is invalid; allowed >= 1")
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_tokens_per_step
        if min_step_recur is not None and (not isinstance(min_step_recur, int) or min_step_recur < 1):
            raise ValueError(f"ContinuousEngine.min_step_recur={min_step_recur!r} is invalid; allowed an int >= 1 "
                             "or None (a step runs every row's token to its end)")
        self.min_step_recur = min_step_recur
        tok = tokenizer.encode_special
        self.bos = tok("<|bos|>")
        self.stop_ids = {tok("<|assistant_end|>"), self.bos}
        self.python_start, self.python_end = tok("<|python_start|>"), tok("<|python_end|>")
        self.output_start, self.output_end = tok("<|output_start|>"), tok("<|output_end|>")
        self.waiting: deque[_Sequence] = deque()
        self.prefilling: list[_Sequence] = []  # admitted, prompt not fully in the cache yet
        self.running: list[_Sequence] = []  # decoding
        self._ids = itertools.count()
        self._by_id: dict[int, _Sequence] = {}
        # counters for metrics (monotonic)
        self.tokens_generated = 0
        self.recurrences_spent = 0

    # --- requests ---------------------------------------------------------------------------------------------------
    def check(self, prompt: list[int], sampling: SamplingParams, decode: DecodeSettings) -> None:
        """Raise ValueError/RequestTooLarge if the request can never run on this engine."""
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} out of range [0, {self.config.vocab_size})")
        if len(prompt) >= self.config.sequence_len:
            raise RequestTooLarge(f"prompt of {len(prompt)} tokens leaves no room in the context of "
                                  f"{self.config.sequence_len} tokens")
        if decode.kv_cache != self.kv_cache:
            raise ValueError(f"decode.kv_cache={decode.kv_cache!r}: this engine's KV pool is {self.kv_cache!r}")
        if self.config.is_recursive and decode.num_recur > self.max_recur:
            raise ValueError(f"decode.num_recur={decode.num_recur} exceeds this engine's max_recur={self.max_recur}")
        if decode.exit is not None and decode.exit.impl.uses_gate and not self.config.exit_gate:
            raise ValueError(f"decode.exit={decode.exit}: this model has no exit gate (GPTConfig.exit_gate=false)")
        if self.pool.blocks_for(self._reserve(prompt, sampling)) > self.pool.num_blocks:
            raise RequestTooLarge(f"prompt ({len(prompt)}) + max_tokens ({sampling.max_tokens}) exceed the KV pool of "
                                  f"{self.pool.num_blocks * self.pool.block_size} tokens")

    def submit(self, prompt: list[int], sampling: SamplingParams, decode: DecodeSettings, meta: Any = None) -> int:
        """Queue a request; returns its sequence id. Raises QueueFull when the waiting queue is at max_waiting."""
        self.check(prompt, sampling, decode)
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests waiting (max_waiting={self.max_waiting})")
        seq = _Sequence(next(self._ids), list(prompt), sampling, decode, meta=meta)
        seq.sampler = torch.Generator(device="cpu").manual_seed(sampling.seed)
        seq.noise = torch.Generator(device="cpu").manual_seed((sampling.seed ^ NOISE_STREAM) % (2**63))
        self.waiting.append(seq)
        self._by_id[seq.seq_id] = seq
        return seq.seq_id

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence; its KV blocks are freed at the next step."""
        seq = self._by_id.get(seq_id)
        if seq is not None:
            seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running) + len(self.prefilling),
            "waiting": len(self.waiting),
            "kv_blocks_used": self.pool.used_blocks,
            "kv_blocks_total": self.pool.num_blocks,
            "tokens_generated": self.tokens_generated,
            "mean_recur": self.recurrences_spent / self.tokens_generated if self.tokens_generated else 0.0,
        }

    def _reserve(self, prompt: list[int], sampling: SamplingParams) -> int:
        return min(self.config.sequence_len, len(prompt) + sampling.max_tokens)

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Retire, admit and prefill, then decode one token for every running sequence."""
        events: list[StepEvent] = []
        self._retire_cancelled(events)
        self._admit()
        cap = self._step_cap()
        self._prefill(cap)
        self._decode(events, cap)
        return events

    def _retire_cancelled(self, events: list[StepEvent]) -> None:
        for group in (self.prefilling, self.running):
            for seq in [s for s in group if s.cancelled]:
                group.remove(seq)
                self._finish(seq, "cancelled")
                events.append(StepEvent(seq.seq_id, None, True, "cancelled"))
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
            events.append(StepEvent(seq.seq_id, None, True, "cancelled"))

    def _admit(self) -> None:
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_running:
            seq = self.waiting[0]
            try:
                self.pool.allocate(seq.kv, self._reserve(seq.prompt, seq.sampling))
            except PoolFull:
                return  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            self.prefilling.append(seq)

    def _step_cap(self) -> int | None:
        """Recurrences every in-flight row may run this step (None = as many as it needs).

        With `min_step_recur` set, a step ends once its shallowest row can finish its token (or prompt chunk): deeper
        rows are carried over to the next step, so a low-budget row waits for about max(min_step_recur, its budget)
        recurrences per token, not for its deepest batch mate. A row's own computation is the same however its
        recurrences are split over steps (tested: batch invariance holds with any min_step_recur).
        """
        if self.min_step_recur is None or not self.config.is_recursive:
            return None
        rows = [s for s in self.prefilling] + [s for s in self.running if s.next_input is not None]
        if not rows:
            return None
        least = min(s.decode.num_recur if s.flight is None else int((s.flight.budgets - s.flight.done).min())
                    for s in rows)
        return max(self.min_step_recur, least)

    def _prefill(self, cap: int | None) -> None:
        """Put every prompt token but the last into the cache, in chunks at the full budget. The last prompt token,
        whose output is the first generated token, is decoded like a generated one: its exit rule applies (a one-token
        answer can exit early) and it never warm-starts (its s0 is a prompt token's)."""
        budget = self.prefill_budget
        todo: list[tuple[_Sequence, int]] = []  # (sequence, tokens of its chunk in flight); 0: nothing to prefill
        for seq in list(self.prefilling):
            if seq.flight is not None:
                n = seq.flight.s.size(1)  # a chunk carried over from an earlier step
            else:
                # Chunk boundaries depend on the prompt alone (never on batch mates): ring caches stay batch-invariant.
                n = min(self.prefill_chunk, len(seq.prompt) - 1 - seq.prefilled)
                if n > budget and budget < self.prefill_budget:
                    break  # the step's prefill budget is spent; continue next step
            budget -= n
            todo.append((seq, n))
        for seq, n in todo:
            if n:
                kv = BatchKV.build(self.pool, [seq.kv], n, self.device)
                if seq.flight is None:  # start the next chunk
                    chunk = torch.tensor([seq.prompt[seq.prefilled: seq.prefilled + n]], dtype=torch.long,
                                         device=self.device)
                    seq.flight = self.model.begin_rows(chunk, kv, [seq.decode], generators=[seq.noise], prompt=True)
                self.model.recur_rows(seq.flight, kv, max_steps=cap)
                if not bool(seq.flight.finished.all()):
                    continue  # deeper than this step: carried over
                self.model.finish_rows(seq.flight, kv)  # the coda's cache entries; the logits are not needed
                seq.flight = None
                seq.kv.length += n
                seq.prefilled += n
            if seq.prefilled == len(seq.prompt) - 1:
                self.prefilling.remove(seq)
                seq.next_input = seq.prompt[-1]  # decoded with the running rows, in this same step
                self.running.append(seq)

    def _decode(self, events: list[StepEvent], cap: int | None) -> None:
        carried = [s for s in self.running if s.flight is not None]  # tokens begun in an earlier step
        fresh = [s for s in self.running if s.next_input is not None and s.flight is None]
        rows = carried + fresh
        if not rows:
            return
        kv = BatchKV.build(self.pool, [s.kv for s in rows], 1, self.device)
        r = None if carried else self.model.fixed_budget([s.decode for s in rows])
        if r is not None and (cap is None or cap >= r):  # every row runs r recurrences: one straight-line token
            idx, init, warm, generators = self._token_inputs(rows)
            logits, state = self.model.decode_fixed(idx, kv, r, init_state=init, warm=warm, generators=generators)
            self._finish_tokens(rows, state, logits, [r] * len(rows), events)
            return
        flights = [s.flight for s in carried]
        if fresh:
            fresh_kv = kv.rows(torch.arange(len(carried), len(rows))) if carried else kv
            idx, init, warm, generators = self._token_inputs(fresh)
            flights.append(self.model.begin_rows(idx, fresh_kv, [s.decode for s in fresh], init_state=init, warm=warm,
                                                 generators=generators))
        flight = Flight.cat(flights) if len(flights) > 1 else flights[0]
        self.model.recur_rows(flight, kv, max_steps=cap)
        if cap is None:  # every row ran its token to the end: nothing is carried over
            out, kv_out, ended = flight, kv, rows
        else:
            finished = flight.finished
            for b in (~finished).nonzero().squeeze(1).tolist():
                rows[b].flight = flight.rows(torch.tensor([b], device=self.device))  # carried over to the next step
            done = finished.nonzero().squeeze(1)
            if done.numel() == 0:
                return
            out, kv_out = (flight, kv) if done.numel() == len(rows) else (flight.rows(done), kv.rows(done))
            ended = [rows[b] for b in done.tolist()]
        logits, state = self.model.finish_rows(out, kv_out)
        self._finish_tokens(ended, state, logits, out.done.tolist(), events)

    def _finish_tokens(self, seqs: list[_Sequence], state: torch.Tensor, logits: torch.Tensor, used: list[int],
                       events: list[StepEvent]) -> None:
        for b, seq in enumerate(seqs):
            seq.kv.length += 1
            seq.state = state[b: b + 1]
            seq.flight = None
        self._emit_rows(seqs, logits, used, events)

    def _token_inputs(self, rows: list[_Sequence]):
        """(idx (B, 1), warm-start states or None, warm mask, noise generators) of each row's next token."""
        idx = torch.tensor([[s.next_input] for s in rows], dtype=torch.long, device=self.device)
        warm = torch.tensor([s.decode.warm_start and s.state is not None for s in rows], device=self.device)
        init = None
        if bool(warm.any()):
            init = torch.zeros(len(rows), self.config.n_embd, dtype=self.dtype, device=self.device)
            for b, seq in enumerate(rows):
                if warm[b]:
                    init[b] = seq.state[0]
        return idx, init, warm, [s.noise for s in rows]

    def _emit_rows(self, rows: list[_Sequence], logits: torch.Tensor, used: list[int], events: list[StepEvent]):
        sampled = sample_rows(logits, [s.sampling for s in rows], [s.sampler for s in rows])
        for seq, tok, u in zip(rows, sampled, used, strict=True):
            forced = bool(seq.tools.forced)
            token = seq.tools.forced.popleft() if forced else tok
            seq.generated += 1
            self.tokens_generated += 1
            self.recurrences_spent += u
            reason = self._track(seq, token)
            if reason is None and seq.generated >= seq.sampling.max_tokens:
                reason = "length"
            if reason is None and seq.kv.length + 1 > min(self.config.sequence_len, len(seq.kv.blocks)
                                                          * self.pool.block_size):
                reason = "length"  # the context (or the reservation) is full: the token cannot be fed back
            seq.next_input = token
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            events.append(StepEvent(seq.seq_id, TokenStep(token, u, forced), reason is not None, reason))

    def _track(self, seq: _Sequence, token: int) -> str | None:
        """Stop on stop tokens; run the calculator when a python block closes and queue its output."""
        t = seq.tools
        if token in self.stop_ids:
            return "stop"
        if token == self.python_start:
            t.in_python, t.expr = True, []
        elif token == self.python_end and t.in_python:
            t.in_python = False
            try:
                result = calculate(self.tokenizer.decode(t.expr))
            except CalculatorError:
                return None  # nanochat's behaviour: no output block when the tool fails
            t.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif t.in_python:
            t.expr.append(token)
        return None

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.pool.release(seq.kv)
        self._by_id.pop(seq.seq_id, None)
