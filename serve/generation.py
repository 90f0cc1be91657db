"""What the ingress asks a tier replica for, and what comes back: the types that cross the Ray process boundary.

    GenerationRequest(prompt, SamplingParams, DecodeSettings)  ->  StreamChunk ... StreamChunk, Completion

`TokenDecoder` turns token ids into the text pieces of those chunks. Pure Python (no Ray, no torch compute).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from recursive_model.batching import SamplingParams
from recursive_model.recurrence import DecodeSettings


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: prompt ids, how to sample, and how to decode (budget r, KV, exit rule)."""

    prompt: tuple[int, ...]
    sampling: SamplingParams
    decode: DecodeSettings
    stop: tuple[str, ...] = ()  # the completion ends before the first of these strings (which it does not contain)


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
    first_token_s: float = 0.0  # arrival at the replica -> first token (queue wait + prefill)
    tokens: list[int] = field(default_factory=list)  # the generated ids behind `text` (stop token excluded)
    stop_token: int | None = None  # the id that ended the turn, when one did

    @property
    def mean_recur(self) -> float:
        return sum(self.recurs) / len(self.recurs) if self.recurs else 0.0


def find_stop(text: str, stop: tuple[str, ...], start: int = 0) -> tuple[int | None, int]:
    """(where the first stop string in `text[start:]` begins or None, how many trailing characters could still begin
    one): text before the second number is final, the rest must wait for the next token."""
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    if hits:
        return min(hits), 0
    hold = max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
    return None, hold


class TokenDecoder:
    """Token ids -> text pieces, holding back the bytes of a character split across tokens."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.id_to_token(token))

    @property
    def pending(self) -> bool:
        """Whether the last token ended inside a character (its bytes wait for the next token)."""
        return bool(self._utf8.getstate()[0])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
