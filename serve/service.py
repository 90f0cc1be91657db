"""What the ingress does per request, without Ray: body -> validated plan (tier + generation request) -> responses.

`ChatPlanner.plan` turns raw request bytes into the tier to call and the `GenerationRequest` to send it (prompt,
SamplingParams, and the route's DecodeSettings unchanged), or raises RequestError naming the bad field.
`StreamFormatter` turns the tier's events into OpenAI SSE chunks; `error_response` turns a RequestError into the
HTTP error (with Retry-After when the tier is full). The Serve ingress (`serve.app.Ingress`) only adds HTTP, auth and
the calls to the tier deployments.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from recursive_model.batching import SamplingParams
from recursive_model.recurrence import EXIT_CRITERIA

from .config import ServeConfig
from .generation import Completion, GenerationRequest, StreamChunk
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    completion_response,
    new_completion_id,
    parse_chat_request,
    sse,
)
from .protocol import error_body as _error_body
from .protocol import usage as _usage
from .router import Budget, BudgetRouter, RequestError, Route, merge_budgets, model_budget


@dataclass(frozen=True)
class Plan:
    """A validated request: where it goes and what runs there."""

    request: ChatCompletionRequest
    route: Route
    generation: GenerationRequest
    completion_id: str


class Planner:
    """What both completion endpoints share: the model id and body -> budget -> route, token limits, sampling."""

    def __init__(self, config: ServeConfig, tokenizer: Any, sequence_len: int):
        self.config = config
        self.tokenizer = tokenizer
        self.sequence_len = sequence_len
        self.router = BudgetRouter(config.tiers, config.default_tier)

    def route(self, req: ChatCompletionRequest | CompletionRequest) -> Route:
        """The route of the budget the model id and the body's fields ask for together."""
        by_model = model_budget(req.model, self.config.model_name)
        return self.router.route(merge_budgets(req.model or "", by_model, req.budget()))

    def check_max_tokens(self, field: str, max_tokens: int) -> None:
        if max_tokens > self.config.max_tokens_limit:
            raise RequestError(field, f"{field}={max_tokens} is above the limit of {self.config.max_tokens_limit}")

    @staticmethod
    def sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
        # Without a seed each request draws its own: batch mates never share a random stream.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, seed=seed)

    def model_ids(self) -> list[dict[str, Any]]:
        """One model id per tier (`base:TIER`, at the tier's default r) and per r some tier serves (`base@rN`)."""
        base = self.config.model_name
        ids = []
        for t in self.config.tiers:
            ids.append(self._model_entry(f"{base}:{t.name}", t.name, t.recur))
        for r in range(1, self.router.r_limit + 1):
            if any(t.r_min <= r <= t.r_max for t in self.config.tiers):
                ids.append(self._model_entry(f"{base}@r{r}", self.router.route(Budget(max_recur=r)).tier, r))
        return ids

    def _model_entry(self, model_id: str, tier: str, recur: int) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": "rnc",
            "root": self.config.model_name,
            "tier": tier,
            "recur": recur,
        }


class ChatPlanner(Planner):
    """Validation, budget routing and prompt rendering for /v1/chat/completions."""

    def plan(self, body: bytes) -> Plan:
        req = parse_chat_request(body)
        cfg = self.config
        max_tokens = req.requested_max_tokens() or cfg.default_max_tokens
        self.check_max_tokens("max_tokens" if req.max_tokens is not None else "max_completion_tokens", max_tokens)
        route = self.route(req)
        try:
            ids = self.tokenizer.render_for_completion(req.conversation())
        except ValueError as exc:
            raise RequestError("messages", f"messages: {exc}") from None
        if len(ids) >= self.sequence_len:
            raise RequestError(
                "messages",
                f"messages: the prompt is {len(ids)} tokens, longer than the model's context of "
                f"{self.sequence_len - 1} prompt tokens",
                code="context_length_exceeded",
            )
        generation = GenerationRequest(prompt=tuple(ids), sampling=self.sampling(req, max_tokens), decode=route.decode)
        return Plan(req, route, generation, new_completion_id())

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the model with its tiers (what the chat page's budget control offers), then the ids that
        name a budget (`model_ids`)."""
        tiers = [
            {
                "name": t.name,
                "r_min": t.r_min,
                "r_max": t.r_max,
                "default_recur": t.recur,
                "kv_cache": t.kv_cache,
                "exit": str(t.exit) if t.exit is not None else None,
                "description": t.description,
            }
            for t in self.router.tiers
        ]
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "rnc",
                    "context_length": self.sequence_len,
                    "max_tokens_limit": self.config.max_tokens_limit,
                    "default_tier": self.router.default_tier,
                    "exit_criteria": {name: c.description for name, c in EXIT_CRITERIA.items()},
                    "tiers": tiers,
                },
                *self.model_ids(),
            ],
        }

    def completion(self, plan: Plan, done: Completion) -> dict[str, Any]:
        """The non-streaming response body."""
        return completion_response(
            plan.completion_id,
            self.config.model_name,
            plan.route.tier,
            plan.route.num_recur,
            done.text,
            done.finish_reason,
            done.prompt_tokens,
            done.recurs,
        )


class StreamFormatter:
    """Tier events -> SSE bytes of one streaming response."""

    def __init__(self, plan: Plan, model: str):
        self.plan = plan
        self.model = model
        self.tier = plan.route.tier

    def start(self) -> bytes:
        return sse(chunk(self.plan.completion_id, self.model, self.tier, {"role": "assistant", "content": ""}))

    def event(self, ev: StreamChunk | Completion) -> bytes:
        if isinstance(ev, StreamChunk):
            return sse(
                chunk(
                    self.plan.completion_id,
                    self.model,
                    self.tier,
                    {"content": ev.text},
                    per_token=ev.recurs,
                    token_text=ev.pieces,
                )
            )
        mean = round(ev.mean_recur, 4)
        extra = {
            "usage": _usage(ev.prompt_tokens, ev.completion_tokens),
            "recurrence": {"budget": self.plan.route.num_recur, "mean": mean},
        }
        return sse(
            chunk(self.plan.completion_id, self.model, self.tier, {}, finish_reason=ev.finish_reason, extra=extra)
        ) + sse("[DONE]")

    @staticmethod
    def error(message: str, status: int = 500, param: str | None = None) -> bytes:
        """An error event after the response has started (the `openai` client raises APIError on it)."""
        code = "service_unavailable" if status == 503 else "internal_error"
        return sse(_error_body(message, param, code=code, err_type="server_error"))


def error_response(exc: RequestError) -> tuple[dict[str, Any], int, dict[str, str]]:
    """(body, status, headers) of the HTTP answer to a RequestError: a full tier says when to retry."""
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
    return _error_body(exc.message, exc.param, exc.code), exc.status, headers
