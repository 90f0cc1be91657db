"""Validation of the eval settings that arrive as arguments: the r list and the adaptive exit rule."""

from __future__ import annotations

from collections.abc import Sequence

from ..recurrence import ExitRule


def check_recurrences(recurrences: Sequence[int]) -> list[int]:
    """Sorted distinct r values; ValueError naming the first r that is not an int >= 1."""
    if isinstance(recurrences, str | bytes) or not recurrences:
        raise ValueError("recurrences must be a non-empty list of integers >= 1")
    for r in recurrences:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"recurrence r={r!r} is invalid: every r must be an integer >= 1")
    return sorted(set(recurrences))


def check_adaptive(adaptive: ExitRule | None) -> ExitRule | None:
    """The adaptive exit rule as given; a spec string is parsed at the edge (CLI, EvalSpec), not here."""
    if adaptive is not None and not isinstance(adaptive, ExitRule):
        raise ValueError(
            f"adaptive={adaptive!r} must be an ExitRule or None; parse a spec such as 'kl:5e-4' with ExitRule.parse"
        )
    return adaptive
