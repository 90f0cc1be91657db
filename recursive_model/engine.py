"""Generation for one-shot callers: a batch of prompts in, tokens and recurrences out, on the continuous engine.

`Engine.generate` keeps the per-call form (every setting applies to every row) on top of `ContinuousEngine`: the
prompts are submitted together and decoded until each one stops. Every generated token reports how many recurrences
produced it. Settings: `decode` (a DecodeSettings; default the checkpoint's `config.decode`) plus the per-call
shorthands `num_recur`, `kv_cache`, `exit`, `warm_start` that replace its fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .batching import ContinuousEngine, SamplingParams, StepEvent, TokenStep
from .model import GPT
from .recurrence import DecodeSettings, ExitRule

__all__ = ["Engine", "GenerationResult", "TokenStep", "SamplingParams", "resolve_decode"]

_KEEP = object()  # "not given": keep the base settings' value (distinct from exit=None, which turns exit off)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)  # generated ids, without the stop token
    recurs: list[int] = field(default_factory=list)  # recurrences per generated token
    text: str = ""
    finish_reason: str = "length"  # "stop" (assistant_end/bos) or "length"

    @property
    def mean_recur(self) -> float:
        return sum(self.recurs) / len(self.recurs) if self.recurs else 0.0


def resolve_decode(base: DecodeSettings, decode: DecodeSettings | None = None, num_recur: int | None = None,
                   kv_cache: str | None = None, exit: ExitRule | str | None | object = _KEEP,
                   warm_start: bool | None = None) -> DecodeSettings:
    """`decode` (or `base`) with the given shorthands applied; exit may be an ExitRule, 'kl:5e-4', or None (off)."""
    s = decode or base
    changes = {}
    if num_recur is not None:
        changes["num_recur"] = int(num_recur)
    if kv_cache is not None:
        changes["kv_cache"] = kv_cache
    if exit is not _KEEP:
        changes["exit"] = ExitRule.parse(exit) if isinstance(exit, str) else exit
    if warm_start is not None:
        changes["warm_start"] = bool(warm_start)
    return s.replace(**changes) if changes else s


class Engine:
    """Generation over a GPT + Tokenizer. Thread-unsafe; one call at a time (Serve runs a ContinuousEngine)."""

    def __init__(self, model: GPT, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        tok = tokenizer.encode_special
        self.bos = tok("<|bos|>")
        self.stop_ids = {tok("<|assistant_end|>"), self.bos}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        prompts: list[list[int]] | list[int],
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        decode: DecodeSettings | None = None,
        num_recur: int | None = None,
        kv_cache: str | None = None,
        exit: ExitRule | str | None | object = _KEEP,
        warm_start: bool | None = None,
    ) -> Iterator[list[TokenStep | None]]:
        """Yield, per decoding step, one TokenStep per prompt (None where that row has no new token: it has stopped,
        or it has no token in this step).

        Row b samples with seed `seed + b`, so a prompt's tokens do not depend on the other prompts of the call.
        """
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # a single prompt
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"generate: max_tokens={max_tokens!r} must be an int >= 1")
        settings = resolve_decode(self.config.decode, decode, num_recur, kv_cache, exit, warm_start)
        longest = max(len(p) for p in prompts)
        if longest >= self.config.sequence_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room in the context of "
                             f"{self.config.sequence_len} tokens")
        budget = sum(min(self.config.sequence_len, len(p) + max_tokens) for p in prompts)
        core = ContinuousEngine(self.model, self.tokenizer, kv_cache=settings.kv_cache,
                                max_recur=settings.num_recur, kv_tokens=budget + 16 * len(prompts),
                                max_running=len(prompts), prefill_chunk=self.config.sequence_len,
                                prefill_tokens_per_step=sum(len(p) for p in prompts))
        ids = [core.submit(p, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                             seed=seed + b), settings) for b, p in enumerate(prompts)]
        row_of = {sid: b for b, sid in enumerate(ids)}
        while core.has_work:
            events: list[StepEvent] = core.step()
            per_row: list[list[TokenStep]] = [[] for _ in prompts]
            for ev in events:
                if ev.step is not None:
                    per_row[row_of[ev.seq_id]].append(ev.step)
            # A step gives each row at most one token; several would be yielded one per item.
            for k in range(max(len(steps) for steps in per_row)):
                yield [steps[k] if k < len(steps) else None for steps in per_row]

    def generate_batch(self, prompts: list[list[int]] | list[int], **kwargs) -> list[GenerationResult]:
        """Run `generate` to the end and collect tokens, recurrences and text per prompt."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        results = [GenerationResult() for _ in prompts]
        for step in self.generate(prompts, **kwargs):
            for res, ts in zip(results, step, strict=True):
                if ts is None or res.finish_reason == "stop":
                    continue
                if ts.token in self.stop_ids:
                    res.finish_reason = "stop"
                    continue
                res.tokens.append(ts.token)
                res.recurs.append(ts.num_recur)
        for res in results:
            res.text = self.tokenizer.decode(res.tokens)
        return results
