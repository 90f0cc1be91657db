"""Budget routing: a request's compute budget -> the cheapest tier that satisfies it, and how it is decoded there.

A budget is a named tier, or a maximum number of recurrences per token (`max_recur`), plus an optional adaptive-exit
rule (`exit_threshold`, `exit_criterion`). A tier satisfies `max_recur = b` when b lies in its [r_min, r_max]; among
those the cheapest (smallest r_max, then config order) wins, and the request runs at r = b. So a shallow request never
waits behind deep ones, and a deep request never runs shallower than asked. The result is a `Route`: the tier and one
`DecodeSettings`, which travels unchanged to the replica's engine. Pure Python: the ingress calls it, tests call it
without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from recursive_model.recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule

from .config import TierConfig


class RequestError(ValueError):
    """A bad request: HTTP `status` with a message naming the offending request field (`param`)."""

    def __init__(
        self,
        param: str | None,
        message: str,
        status: int = 400,
        code: str = "invalid_request_error",
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s  # set on 503/429: the client may retry after this many seconds

    def __reduce__(self):  # crosses Ray process boundaries intact (the default would drop param/status)
        return (RequestError, (self.param, self.message, self.status, self.code, self.retry_after_s))


@dataclass(frozen=True)
class Budget:
    """What a request is willing to spend. Empty = the default tier at its default r and exit rule."""

    tier: str | None = None
    max_recur: int | None = None  # recurrences per token
    exit_threshold: float | None = None  # adaptive exit: stop recurring once the criterion falls below this
    exit_criterion: str | None = None  # a name in EXIT_CRITERIA; default: the tier's rule's, else the first one


def model_budget(model: str | None, base: str) -> Budget:
    """The budget a model id names: `base`, `base:TIER`, `base@rN` or `base:TIER@rN` (see GET /v1/models), so a
    client that can only choose `model` (lm-eval, most OpenAI SDK users) still chooses its compute. None or "" is
    the base model. RequestError 404 naming `model` for another model."""
    if not model or model == base:
        return Budget()
    name, tier, r = model, None, None
    head, at, recur = name.rpartition("@r")
    if at and recur.isdigit():
        name, r = head, int(recur)
    head, colon, tier_name = name.partition(":")
    if colon:
        name, tier = head, tier_name
    if name != base or (colon and not tier_name):
        raise RequestError(
            "model",
            f"model {model!r} is not served here; use {base!r}, {base + ':TIER'!r} or {base + '@rN'!r} "
            "(see GET /v1/models)",
            status=404,
            code="model_not_found",
        )
    return Budget(tier=tier, max_recur=r)


def merge_budgets(model: str, by_model: Budget, by_body: Budget) -> Budget:
    """The request body's budget fields with the model id's; a field both set to different values is a 400 naming
    both (`model` and the body field)."""
    for field_name in ("tier", "max_recur"):
        named, given = getattr(by_model, field_name), getattr(by_body, field_name)
        if named is not None and given is not None and named != given:
            raise RequestError(
                "model",
                f"model={model!r} asks for {field_name}={named!r} but the request sets {field_name}={given!r}; "
                "drop one of the two",
            )
    return replace(
        by_body,
        tier=by_body.tier if by_body.tier is not None else by_model.tier,
        max_recur=by_body.max_recur if by_body.max_recur is not None else by_model.max_recur,
    )


@dataclass(frozen=True)
class Route:
    """Where a request goes and how it is decoded there."""

    tier: str
    decode: DecodeSettings  # r (the ceiling when an exit rule is set), the tier's KV strategy, the exit rule

    @property
    def num_recur(self) -> int:
        return self.decode.num_recur


class BudgetRouter:
    """Maps budgets to tiers. Built once per ingress replica from the tier configs."""

    def __init__(self, tiers: Sequence[TierConfig], default_tier: str | None = None):
        if not tiers:
            raise ValueError("BudgetRouter needs at least one tier")
        # Cost order: per-token compute grows with r, so r_max is the price; ties keep config order.
        self.tiers = sorted(tiers, key=lambda t: t.r_max)
        self.by_name = {t.name: t for t in tiers}
        if default_tier is not None and default_tier not in self.by_name:
            raise ValueError(f"default_tier={default_tier!r} is not one of {list(self.by_name)}")
        self.default_tier = default_tier or self.tiers[0].name

    @property
    def r_limit(self) -> int:
        """The deepest budget any tier accepts."""
        return max(t.r_max for t in self.tiers)

    def describe_ranges(self) -> str:
        return ", ".join(f"{t.name} [{t.r_min}, {t.r_max}]" for t in self.tiers)

    def route(self, budget: Budget) -> Route:
        """The tier and generation settings for `budget`; RequestError naming the field when none fits."""
        if budget.tier is not None:
            tier = self.by_name.get(budget.tier)
            if tier is None:
                raise RequestError("tier", f"unknown tier {budget.tier!r}; available tiers: {self.describe_ranges()}")
            if budget.max_recur is not None and not tier.r_min <= budget.max_recur <= tier.r_max:
                raise RequestError(
                    "max_recur",
                    f"max_recur={budget.max_recur} is outside tier {tier.name!r}'s range [{tier.r_min}, {tier.r_max}]",
                )
            r = budget.max_recur if budget.max_recur is not None else tier.recur
        elif budget.max_recur is not None:
            if budget.max_recur < 1:
                raise RequestError("max_recur", f"max_recur={budget.max_recur} must be >= 1")
            fitting = [t for t in self.tiers if t.r_min <= budget.max_recur <= t.r_max]
            if not fitting:
                raise RequestError(
                    "max_recur",
                    f"max_recur={budget.max_recur} is out of range: no tier serves it; tier ranges: "
                    f"{self.describe_ranges()}",
                )
            tier, r = fitting[0], budget.max_recur
        else:
            tier = self.by_name[self.default_tier]
            r = tier.recur

        return Route(tier=tier.name, decode=tier.decode(r, self._exit_rule(budget, tier, r)))

    @staticmethod
    def _exit_rule(budget: Budget, tier: TierConfig, r: int) -> ExitRule | None:
        """The request's exit rule: its own threshold (and criterion), else the tier's default rule."""
        criterion = budget.exit_criterion
        if criterion is not None and criterion not in EXIT_CRITERIA:
            raise RequestError("exit_criterion", f"exit_criterion={criterion!r}; allowed {sorted(EXIT_CRITERIA)}")
        default = tier.exit
        if budget.exit_threshold is None:
            if criterion is None or (default is not None and default.criterion == criterion):
                return default if default is None or default.min_recur <= r else replace(default, min_recur=r)
            # A threshold means different things for different criteria: the tier's cannot be reused for another.
            raise RequestError(
                "exit_threshold",
                f"exit_criterion={criterion!r} needs an exit_threshold: tier {tier.name!r} has no default rule for it "
                f"(its default: {default or 'none'})",
            )
        if budget.exit_threshold <= 0:
            raise RequestError("exit_threshold", f"exit_threshold={budget.exit_threshold} must be > 0")
        if criterion is None:
            criterion = default.criterion if default is not None else next(iter(EXIT_CRITERIA))
        min_recur = min(default.min_recur if default is not None else 1, r)
        return ExitRule(criterion=criterion, threshold=budget.exit_threshold, min_recur=min_recur)
