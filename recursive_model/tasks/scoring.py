"""Eval results and ChatCORE (nanochat): the mean over tasks of accuracy centred on the chance baseline."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from recursive_model.tasks.base import check_choice


@dataclass
class EvalResult:
    """Outcome of one task evaluated at one setting (num_recur, exit criterion)."""

    task: str
    eval_type: str  # "categorical" | "generative"
    accuracy: float
    num_correct: int
    total: int
    num_choices: int | None = None  # categorical only: sets the chance baseline
    num_recur: int | None = None  # the requested recurrences (None = the model's default)
    mean_recur: float | None = None  # generative only: mean recurrences actually used per generated token
    tokens_generated: int | None = None
    # generative tasks whose problems carry a "difficulty" (e.g. hops): {difficulty: {"total", "num_correct",
    # "accuracy", "mean_recur", "tokens_generated"}}, string keys (JSON): do harder problems get more recurrences?
    by_difficulty: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def centered_accuracy(accuracy: float, eval_type: str, num_choices: int | None = None) -> float:
    """(accuracy - baseline) / (1 - baseline); baseline 1/num_choices for categorical tasks, 0 for generative."""
    check_choice("eval_type", eval_type, ("categorical", "generative"))
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy={accuracy} must be in [0, 1]")
    if eval_type == "generative":
        return accuracy
    if num_choices is None or num_choices < 2:
        raise ValueError(f"num_choices={num_choices!r} must be an int >= 2 for a categorical task")
    baseline = 1.0 / num_choices
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results: Mapping[str, EvalResult | Mapping[str, Any]] | Iterable[EvalResult | Mapping[str, Any]]) -> float:
    """Mean centred accuracy over tasks (results as EvalResult or dicts with accuracy, eval_type, num_choices)."""
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not items:
        raise ValueError("chatcore needs at least one task result")
    scores = []
    for item in items:
        r = item.to_dict() if isinstance(item, EvalResult) else item
        scores.append(centered_accuracy(r["accuracy"], r["eval_type"], r.get("num_choices")))
    return sum(scores) / len(scores)
