"""The OpenAI-compatible wire format: request parsing (errors name the field) and response / SSE chunk builders.

Extensions, all optional and ignored by OpenAI clients:
  request:  `tier`, `max_recur` (max recurrences per token), `exit_threshold`, `exit_criterion` (a name in
            EXIT_CRITERIA), `top_k` (the `openai` client sends them with `extra_body={...}`); `seed` is OpenAI's
  response: `tier`, and `recurrence` = {"budget": r, "mean": mean r per generated token, "per_token": [...]}
  chunks:   `tier`, `recurrence.per_token` and `token_text` (the text of each token in the chunk), so a client can
            show what each token cost; the last chunk carries `usage` and `recurrence.mean`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from recursive_model.recurrence import EXIT_CRITERIA
from recursive_model.yaml_config import loc_to_path

from .router import Budget, RequestError

_T = TypeVar("_T", bound=BaseModel)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": accepted, unused
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingAndBudget(BaseModel):
    """The fields both completion endpoints share: sampling, and the compute budget (extensions)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # may name a budget too: `base:TIER`, `base@rN` (serve.router.model_budget)
    temperature: float = Field(1.0, ge=0, le=2)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)  # one choice per prompt: batching across requests is the server's job
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)  # same seed, same sampled tokens, whatever else the replica runs
    # --- compute budget (extensions) ---
    tier: str | None = None
    max_recur: int | None = Field(None, ge=1)
    exit_threshold: float | None = Field(None, gt=0)
    exit_criterion: str | None = Field(None, description="one of recursive_model.recurrence.EXIT_CRITERIA")

    @field_validator("exit_criterion")
    @classmethod
    def _check_criterion(cls, v: str | None) -> str | None:
        if v is not None and v not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion={v!r} is not a criterion; allowed {sorted(EXIT_CRITERIA)}")
        return v

    def budget(self) -> Budget:
        """The budget the body's own fields ask for (the model id may add to it)."""
        return Budget(self.tier, self.max_recur, self.exit_threshold, self.exit_criterion)


class ChatCompletionRequest(_SamplingAndBudget):
    """POST /v1/chat/completions body. Unknown OpenAI fields (presence_penalty, user, ...) are accepted and ignored."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name of max_tokens

    @field_validator("messages")
    @classmethod
    def _check_turns(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def conversation(self) -> dict[str, Any]:
        """nanochat conversation with an empty assistant turn appended (render_for_completion drops it)."""
        msgs = [{"role": m.role, "content": m.text()} for m in self.messages]
        return {"messages": [*msgs, {"role": "assistant", "content": ""}]}


MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_STOP = 4  # as OpenAI


class CompletionRequest(_SamplingAndBudget):
    """POST /v1/completions body (OpenAI's legacy completions, as vLLM serves them). `prompt` is normalized by
    `parse_completion_request` into `prompts`: one entry per choice, text or token ids."""

    prompt: Any = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool = False  # the prompt comes back in front of the completion (text and logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top-n alternatives per position
    stop: str | list[str] | None = None
    prompts: list[str | list[int]] = Field(default_factory=list, exclude=True)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOP} non-empty strings, got {v!r}")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("body", "request body must be a JSON object")
    return data


def _validate(model: type[_T], data: dict[str, Any]) -> _T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p in _UNION_TAGS))
        param = loc_to_path(loc) or "body"
        raise RequestError(param, f"{param}: {err.get('msg', 'invalid value')}") from None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a request body; RequestError with `param` = the offending field (e.g. `messages[0].role`)."""
    data = _load_object(body)
    if "messages" in data and data["messages"] == []:
        raise RequestError("messages", "messages is empty: send at least one user message")
    return _validate(ChatCompletionRequest, data)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Validate a /v1/completions body; `prompt` (a string, strings, token ids, or lists of token ids) becomes
    `prompts`. RequestError naming the field (`prompt[1][3]`, `max_tokens`, ...)."""
    data = _load_object(body)
    req = _validate(CompletionRequest, data)
    req.prompts = _prompts(req.prompt)
    if req.max_tokens == 0 and not req.echo:
        raise RequestError("max_tokens", "max_tokens=0 generates nothing: allowed only with echo=true")
    if req.stream and len(req.prompts) > 1:
        raise RequestError("prompt", f"stream=true takes one prompt; got {len(req.prompts)}")
    if req.stream and req.logprobs is not None:
        raise RequestError("logprobs", "logprobs are not streamed; send stream=false to get them")
    return req


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts (text or ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt", "prompt must be a string, a list of strings, token ids or lists of token ids")
    if all(_is_id(t) for t in prompt):
        return [list(prompt)]
    out: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            out.append(list(item))
        else:
            raise RequestError(
                f"prompt[{i}]", f"prompt[{i}] must be a string or a non-empty list of token ids, got {item!r:.80}"
            )
    return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# pydantic puts union member names into error locations (messages.0.content.str); they are not request fields.
_UNION_TAGS = {"str", "list[ContentPart]", "function-after[_check_turns(), list[ChatMessage]]"}


def error_body(
    message: str, param: str | None = None, code: str = "invalid_request_error", err_type: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    completion_id: str,
    model: str,
    tier: str,
    budget_r: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    recurs: list[int],
) -> dict[str, Any]:
    """A `chat.completion` object with the compute actually spent."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, len(recurs)),
        "tier": tier,
        "recurrence": {"budget": budget_r, "mean": _mean(recurs), "per_token": recurs},
    }


def chunk(
    completion_id: str,
    model: str,
    tier: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    per_token: list[int] | None = None,
    token_text: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object."""
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "tier": tier,
    }
    if per_token is not None:
        out["recurrence"] = {"per_token": per_token}
        out["token_text"] = token_text or []
    if extra:
        out.update(extra)
    return out


# Characters JSON leaves raw but Python's str.splitlines (and so httpx's `iter_lines`) ends a line at: escaped, an
# event stays one line for every client. JSON escapes the ASCII ones (\x0b, \x0c, \x1c-\x1e) itself.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload.translate(_LINE_BREAKS)}\n\n".encode()


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0
