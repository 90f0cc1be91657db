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
from .protocol import ChatCompletionRequest, chunk, completion_response, new_completion_id, parse_chat_request, sse
from .protocol import error_body as _error_body
from .protocol import usage as _usage
from .router import BudgetRouter, RequestError, Route


@dataclass(frozen=True)
class Plan:
    """A validated request: where it goes and what runs there."""

    request: ChatCompletionRequest
    route: Route
    generation: GenerationRequest
    completion_id: str


class ChatPlanner:
    """Validation, budget routing and prompt rendering for /v1/chat/completions."""

    def __init__(self, config: ServeConfig, tokenizer: Any, sequence_len: int):
        self.config = config
        self.tokenizer = tokenizer
        self.sequence_len = sequence_len
        self.router = BudgetRouter(config.tiers, config.default_tier)

    def plan(self, body: bytes) -> Plan:
        req = parse_chat_request(body)
        cfg = self.config
        if req.model not in (None, "", cfg.model_name):
            raise RequestError(
                "model",
                f"model {req.model!r} is not served here; use {cfg.model_name!r} (see GET /v1/models)",
                status=404,
                code="model_not_found",
            )
        max_tokens = req.requested_max_tokens() or cfg.default_max_tokens
        if max_tokens > cfg.max_tokens_limit:
            field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
            raise RequestError(field, f"{field}={max_tokens} is above the limit of {cfg.max_tokens_limit}")
        route = self.router.route(req.budget())
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
        # Without a seed each request draws its own: batch mates never share a random stream.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, seed=seed)
        generation = GenerationRequest(prompt=tuple(ids), sampling=sampling, decode=route.decode)
        return Plan(req, route, generation, new_completion_id())

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the one model, with its tiers (what the chat page's budget control offers)."""
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
                }
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
