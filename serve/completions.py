"""/v1/completions (OpenAI's legacy completions, as vLLM serves them) without Ray: plan, run on a replica, respond.

    body -> CompletionPlanner.plan -> CompletionPlan(route, one PromptPlan per prompt)
         -> run_prompt(plan, prompt, replica) per prompt: generation on the tier's engine and/or one scoring forward
         -> CompletionPlanner.response (or CompletionStreamFormatter for stream=true)

Log-probabilities come from one full forward at the request's r over prompt + completion (serve.scoring), never from
decoding the prompt. A greedy one-token request that asks for log-probabilities (lm-eval's loglikelihood request:
echo, logprobs=1, max_tokens=1, temperature=0) is answered by that forward alone: its token is the argmax after the
prompt. Generated tokens' log-probabilities are those of the same full forward, which equals what the engine sampled
from for an exact KV cache and no exit rule; for ring/final caches or an early exit it is the full-depth reference.
String prompts start with <|bos|>, like a Hugging Face tokenizer that adds it; token-id prompts run exactly as sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .generation import Completion, GenerationRequest, StreamChunk, TokenDecoder, find_stop
from .protocol import CompletionRequest, new_completion_id, parse_completion_request, sse, usage
from .router import RequestError, Route
from .scoring import ScoreRequest, TokenScores
from .service import Planner


class Replica(Protocol):
    """What a completion needs from a tier replica (`serve.batcher.ReplicaBatcher`, or the ingress's handle)."""

    async def generate(self, req: GenerationRequest) -> Completion: ...
    async def score(self, req: ScoreRequest) -> TokenScores: ...


@dataclass(frozen=True)
class PromptPlan:
    """One prompt of a request: its ids and what runs for it."""

    ids: tuple[int, ...]
    generation: GenerationRequest | None  # None: nothing to decode (max_tokens=0, or the one-forward answer)
    scored: bool  # one forward for log-probabilities (or for the one-forward answer)


@dataclass(frozen=True)
class CompletionPlan:
    request: CompletionRequest
    route: Route
    prompts: tuple[PromptPlan, ...]
    completion_id: str
    stop: tuple[str, ...]
    stop_ids: frozenset[int]


@dataclass
class PromptResult:
    """What ran for one prompt: the completion and, per position of prompt + completion, (id, log p, top)."""

    completion: Completion
    rows: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)


class CompletionPlanner(Planner):
    """Validation, budget routing and tokenization for /v1/completions; the response body."""

    def plan(self, body: bytes) -> CompletionPlan:
        req = parse_completion_request(body)
        max_tokens = req.max_tokens if req.max_tokens is not None else self.config.default_max_tokens
        self.check_max_tokens("max_tokens", max_tokens)
        route = self.route(req)
        one_forward = max_tokens == 1 and req.temperature == 0 and req.logprobs is not None
        prompts = []
        for i, prompt in enumerate(req.prompts):
            ids = self._ids(req, i, prompt)
            decodes = max_tokens > 0 and not one_forward
            limit = self.sequence_len - 1 if decodes else self.sequence_len  # decoding needs room for one token
            if len(ids) > limit:
                raise RequestError(
                    self._path(req, i),
                    f"{self._path(req, i)}: the prompt is {len(ids)} tokens; the model's context takes {limit}",
                    code="context_length_exceeded",
                )
            generation = None
            if decodes:
                sampling = self.sampling(req, max_tokens)
                generation = GenerationRequest(ids, sampling, route.decode, stop=req.stop_strings())
            prompts.append(PromptPlan(ids, generation, scored=req.logprobs is not None))
        # The engine's stop tokens (ContinuousEngine.stop_ids): the one-forward answer ends on them the same way.
        stop_ids = frozenset(self.tokenizer.encode_special(t) for t in ("<|assistant_end|>", "<|bos|>"))
        return CompletionPlan(req, route, tuple(prompts), new_completion_id("cmpl"), req.stop_strings(), stop_ids)

    def _ids(self, req: CompletionRequest, index: int, prompt: str | list[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self.tokenizer.encode(prompt, prepend="<|bos|>"))
        vocab = self.tokenizer.vocab_size
        for j, token in enumerate(prompt):
            if not 0 <= token < vocab:
                path = f"{self._path(req, index)}[{j}]"
                raise RequestError(path, f"{path}={token} is not a token id; allowed [0, {vocab})")
        return tuple(prompt)

    @staticmethod
    def _path(req: CompletionRequest, index: int) -> str:
        """The request field of prompt `index`: `prompt` itself when it was a single string or id list."""
        nested = isinstance(req.prompt, list) and isinstance(req.prompt[0], str | list)
        return f"prompt[{index}]" if nested else "prompt"

    async def run(self, plan: CompletionPlan, prompt: PromptPlan, replica: Replica) -> PromptResult:
        """Decode and/or score one prompt on `replica`: at most one generation and one forward."""
        r, top_n = plan.route.num_recur, plan.request.logprobs or 0
        if prompt.generation is not None:
            done = await replica.generate(prompt.generation)
            if not prompt.scored:
                return PromptResult(done)
            tail = [done.stop_token] if done.stop_token is not None else []
            ids = (*prompt.ids, *done.tokens, *tail)[: self.sequence_len]
            return PromptResult(done, _rows(ids, await replica.score(ScoreRequest(ids, r, top_n))))
        empty = Completion("length", len(prompt.ids), 0)
        if not prompt.scored:  # echo without logprobs: nothing to compute
            return PromptResult(empty)
        scores = await replica.score(ScoreRequest(prompt.ids, r, top_n))
        rows = _rows(prompt.ids, scores)
        if plan.request.max_tokens == 0:
            return PromptResult(empty, rows)
        token, lp = scores.next_top[0]  # the one-forward answer: the greedy token after the prompt
        rows.append((token, lp, scores.next_top[:top_n]))
        if token in plan.stop_ids:
            return PromptResult(Completion("stop", len(prompt.ids), 0, stop_token=token), rows)
        text = self.text_of([token])
        at, _ = find_stop(text, plan.stop)
        reason = "length" if at is None else "stop"
        return PromptResult(Completion(reason, len(prompt.ids), 1, [r], text[:at], tokens=[token]), rows)

    # ------------------------------------------------------------------------------------------------- response
    def response(self, plan: CompletionPlan, results: list[PromptResult]) -> dict[str, Any]:
        """The `text_completion` body: one choice per prompt, with the compute each spent."""
        choices = [self._choice(plan, i, p, res) for i, (p, res) in enumerate(zip(plan.prompts, results, strict=True))]
        recurs = [r for res in results for r in res.completion.recurs]
        prompt_tokens = sum(len(p.ids) for p in plan.prompts)
        return {
            "id": plan.completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": plan.request.model or self.config.model_name,
            "choices": choices,
            "usage": usage(prompt_tokens, len(recurs)),
            "tier": plan.route.tier,
            "recurrence": {"budget": plan.route.num_recur, "mean": _mean(recurs)},
        }

    def _choice(self, plan: CompletionPlan, index: int, prompt: PromptPlan, res: PromptResult) -> dict[str, Any]:
        done = res.completion
        echo = plan.request.echo
        shown = res.rows if echo else res.rows[len(prompt.ids) :]
        text = done.text
        if echo:
            text = self.text_of(prompt.ids) + text
        logprobs = None
        if plan.request.logprobs is not None:
            logprobs = self.logprobs_block(shown)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": done.finish_reason,
            "recurrence": {"per_token": done.recurs},
        }

    def text_of(self, ids: tuple[int, ...] | list[int]) -> str:
        decoder = TokenDecoder(self.tokenizer)
        return "".join([decoder.piece(t) for t in ids] + [decoder.flush()])

    def logprobs_block(self, rows: list[tuple[int, float | None, list[tuple[int, float]] | None]]) -> dict[str, Any]:
        """OpenAI's legacy logprobs object: per position the token's text, its log p, the top alternatives (the
        token itself included, as vLLM does) and where its text starts in the choice's text."""
        decoder = TokenDecoder(self.tokenizer)
        tokens, offsets, offset = [], [], 0
        for token, _, _ in rows:
            piece = decoder.piece(token)
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)

        def top(token: int, lp: float | None, alts: list[tuple[int, float]] | None) -> dict[str, float] | None:
            if lp is None:
                return None
            out = {self.text_of([t]): v for t, v in alts or []}
            out.setdefault(self.text_of([token]), lp)
            return out

        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [top(*row) for row in rows],
            "text_offset": offsets,
        }


def _rows(ids: tuple[int, ...], scores: TokenScores) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
    return list(zip(ids, scores.logprobs, scores.top, strict=True))


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


class CompletionStreamFormatter:
    """Tier events -> SSE `text_completion` chunks of one streamed prompt (echo first, usage last)."""

    def __init__(self, planner: CompletionPlanner, plan: CompletionPlan):
        self.planner = planner
        self.plan = plan
        self.tier = plan.route.tier
        self.model = plan.request.model or planner.config.model_name

    def start(self) -> bytes:
        prompt = self.plan.prompts[0]
        return self._chunk(self.planner.text_of(prompt.ids)) if self.plan.request.echo else b""

    def event(self, ev: StreamChunk | Completion) -> bytes:
        if isinstance(ev, StreamChunk):
            return self._chunk(ev.text, extra={"recurrence": {"per_token": ev.recurs}})
        extra = {
            "usage": usage(ev.prompt_tokens, ev.completion_tokens),
            "recurrence": {"budget": self.plan.route.num_recur, "mean": _mean(ev.recurs)},
        }
        return self._chunk("", ev.finish_reason, extra) + sse("[DONE]")

    def _chunk(self, text: str, finish_reason: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
        return sse(
            {
                "id": self.plan.completion_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                "tier": self.tier,
                **(extra or {}),
            }
        )
