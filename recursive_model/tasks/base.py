"""Task: a sliceable, indexable sequence of conversations with a way to grade a model's answer (nanochat style).

A conversation is `{"messages": [{"role": ..., "content": str | list[part]}]}` (docs/DESIGN.md). Categorical tasks end
in an assistant turn holding one letter and may carry `"letters"` (the choices of that item, nanochat's convention);
generative tasks are graded by `evaluate(conversation, completion_text)`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any, Literal

EvalType = Literal["categorical", "generative"]
Conversation = dict[str, Any]

# Special token strings that a decoded completion may contain (the engine decodes tool calls with them).
_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")
_FINAL_RE = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


class Task:
    """A sequence of conversations, sliced deterministically by start/stop/step over the underlying examples."""

    letters: tuple[str, ...] = ()  # the answer letters of a categorical task ("A", "B", ...)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"{type(self).__name__}.start={start!r} must be an int >= 0")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise ValueError(f"{type(self).__name__}.stop={stop!r} must be None or an int >= start={start}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"{type(self).__name__}.step={step!r} must be an int >= 1")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        """Short name used in eval reports."""
        return type(self).__name__

    @property
    def eval_type(self) -> EvalType:
        """Either categorical (pick a letter) or generative (grade generated text)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        """Number of underlying examples before slicing."""
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        """Conversation at an underlying (unsliced) index."""
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """True if `completion` (generated text, or the picked letter for categorical tasks) is correct."""
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> Conversation:
        n = len(self)
        if not isinstance(index, int):
            raise TypeError(f"{self.name} index must be an int, got {type(index).__name__}")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name} index {index} out of range [0, {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]


def check_choice(field: str, value: Any, allowed: tuple[Any, ...] | list[Any]) -> None:
    """Raise ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {list(allowed)}")


def example_rng(*key: Any) -> random.Random:
    """A Random seeded from a tuple key; str seeds hash with sha512, so this is stable across runs and machines."""
    return random.Random("/".join(str(k) for k in key))


def stable_hash(text: str) -> int:
    """A 64-bit hash of text that is the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def strip_special(text: str) -> str:
    """Remove special-token strings such as <|assistant_end|> from decoded text."""
    return _SPECIAL_RE.sub("", text)


def extract_final_answer(text: str) -> str | None:
    """The number after the last `#### ` marker (commas removed), or None when there is no marker."""
    matches = _FINAL_RE.findall(strip_special(text))
    return matches[-1].replace(",", "") if matches else None


def last_text(message: dict[str, Any]) -> str:
    """The text of a message: its string content, or its last text part."""
    content = message["content"]
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if part["type"] == "text"]
    return texts[-1] if texts else ""


def render_mc(question: str, letters: tuple[str, ...] | list[str], choices: list[str]) -> str:
    """nanochat's multiple-choice prompt: the letter follows each choice so the answer is one letter token."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."
