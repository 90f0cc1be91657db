"""Batched generation with a KV cache, per-token recurrence accounting, adaptive exit and the calculator tool.

One `generate` call serves a batch of prompts of different lengths: they are right-padded into one prefill, then
decoded together, each row at its own position. Every generated token reports how many recurrences produced it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .calculator import CalculatorError, calculate
from .kv_cache import KVCache
from .model import GPT


@dataclass
class TokenStep:
    """One generated token of one row."""

    token: int
    num_recur: int  # recurrences spent on the forward pass that produced this token
    forced: bool = False  # inserted by the calculator tool, not sampled


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)  # generated ids, without the stop token
    recurs: list[int] = field(default_factory=list)  # recurrences per generated token
    text: str = ""
    finish_reason: str = "length"  # "stop" (assistant_end/bos) or "length"

    @property
    def mean_recur(self) -> float:
        return sum(self.recurs) / len(self.recurs) if self.recurs else 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class _RowState:
    """Tool-use bookkeeping of one row: forced tokens to emit and the expression being collected."""

    def __init__(self) -> None:
        self.forced: deque[int] = deque()
        self.in_python = False
        self.expr: list[int] = []
        self.done = False


class Engine:
    """Generation over a GPT + Tokenizer. Thread-unsafe; one call at a time (Serve batches calls into one)."""

    def __init__(self, model: GPT, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        tok = tokenizer.encode_special
        self.bos = tok("<|bos|>")
        self.stop_ids = {tok("<|assistant_end|>"), self.bos}
        self.python_start, self.python_end = tok("<|python_start|>"), tok("<|python_end|>")
        self.output_start, self.output_end = tok("<|output_start|>"), tok("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]] | list[int],
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        num_recur: int | None = None,
        kv_cache: str | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_recur: int | None = None,
        warm_start: bool | None = None,
    ) -> Iterator[list[TokenStep | None]]:
        """Yield, per decoding step, one TokenStep per prompt (None once that row has stopped)."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # a single prompt
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if max_tokens < 1:
            raise ValueError(f"generate: max_tokens={max_tokens} must be >= 1")
        cfg = self.config
        r = cfg.eval_recur if num_recur is None else int(num_recur)
        if cfg.is_recursive and r < 1:
            raise ValueError(f"generate: num_recur={r} must be >= 1")
        warm = cfg.recur_warm_start if warm_start is None else warm_start
        B, dev = len(prompts), self.device
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        longest = int(lengths.max())
        if longest >= cfg.sequence_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room in the context of {cfg.sequence_len} tokens")
        max_len = min(cfg.sequence_len, longest + max_tokens)
        cache = KVCache(cfg, B, max_len, num_recur=max(r, 1), strategy=kv_cache, device=dev,
                        dtype=next(self.model.parameters()).dtype)
        ids = torch.zeros((B, longest), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        kw = dict(num_recur=r, exit_criterion=exit_criterion, exit_threshold=exit_threshold, min_recur=min_recur)
        # The prompt is processed at the full r: adaptive exit applies to generated tokens.
        logits, used, state = self.model.forward_cached(ids, cache, lengths=lengths, num_recur=r)
        rows = [_RowState() for _ in range(B)]
        for _ in range(max_tokens):
            sampled = sample_next(logits, temperature, top_k, gen).tolist()
            used_list = used.tolist()
            step: list[TokenStep | None] = []
            next_ids = []
            for b, row in enumerate(rows):
                if row.done:
                    step.append(None)
                    next_ids.append(self.bos)  # finished rows ride along; their output is ignored
                    continue
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else sampled[b]
                step.append(TokenStep(token, used_list[b], forced))
                next_ids.append(token)
                self._track_tools(row, token)
            yield step
            if all(row.done for row in rows) or int(cache.pos.max()) >= max_len:
                return
            x = torch.tensor(next_ids, dtype=torch.long, device=dev)[:, None]
            logits, used, state = self.model.forward_cached(x, cache, init_state=state if warm else None, **kw)

    def _track_tools(self, row: _RowState, token: int) -> None:
        """Stop on stop tokens; run the calculator when a python block closes and queue its output."""
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.in_python, row.expr = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            try:
                result = calculate(self.tokenizer.decode(row.expr))
            except CalculatorError:
                return  # nanochat's behaviour: no output block when the tool fails
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.expr.append(token)

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
