"""Recurrence settings, one home: how r is drawn in training, how a token is decoded, and when it may exit early.

- `RecurrenceSampling`: the per-step training draw of r (Poisson log-normal, see sampling.py) and truncated BPTT.
- `DecodeSettings`: one frozen object (budget r, KV strategy, exit rule, warm start) that travels unchanged from an
  HTTP request, a CLI flag or an eval spec down to `GPT.forward_cached`. It is hashable, so a batcher can group by it.
- `ExitRule` + `ExitCriterion`: adaptive exit. One class per criterion behind one interface, in `EXIT_CRITERIA`; every
  validator (config, CLI, HTTP) reads that registry, so a new criterion is one class here and nothing else.

Shapes: N=rows still recurring, D=model dim, V=vocab.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .sampling import sample_num_recur

MAX_RECUR = 1024  # a sanity bound for any r a caller may ask for
MAX_SIGMA = 4.0  # beyond this the log-normal rate spans e^±16: the draw is all-1 or all-r_max, never useful


def _check(owner: str, name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ValueError naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------ training draw
@dataclass(frozen=True, kw_only=True)
class RecurrenceSampling:
    """How many recurrences a training step runs, and through how many of them gradients flow."""

    mean: float = 4.0  # E[r] of the clamped draw (exact mean, not mean + 1)
    sigma: float = 0.5  # log-normal sigma of the Poisson rate
    r_max: int = 16  # r is clamped to [1, r_max]
    bptt_k: int = 4  # gradients flow through the last k recurrences only (truncated BPTT)
    # Deep supervision: the loss is the mean over the last `supervise` differentiated recurrences (coda + head after
    # each), not only the last, so every state the block reaches must already answer and keep answering: what lets an
    # exit fire early and more recurrences never hurt. 1 = the last recurrence only.
    supervise: int = 1
    # Weight of the entropy regulariser of a learned exit gate (GPTConfig.exit_gate); without it the gate's exit
    # distribution collapses onto one step. Only read when the model has a gate.
    gate_entropy: float = 0.05

    def __post_init__(self) -> None:
        o = "RecurrenceSampling"
        _check(o, "r_max", self.r_max, _is_int(self.r_max) and 1 <= self.r_max <= MAX_RECUR,
               f"an int in [1, {MAX_RECUR}]")
        _check(o, "bptt_k", self.bptt_k, _is_int(self.bptt_k) and self.bptt_k >= 1, "an int >= 1")
        _check(o, "mean", self.mean, isinstance(self.mean, int | float) and 1 <= self.mean <= self.r_max,
               f"a number in [1, r_max={self.r_max}]")
        _check(o, "sigma", self.sigma, isinstance(self.sigma, int | float) and 0 < self.sigma <= MAX_SIGMA,
               f"a number in (0, {MAX_SIGMA}]")
        _check(o, "supervise", self.supervise,
               _is_int(self.supervise) and 1 <= self.supervise <= self.bptt_k, f"an int in [1, bptt_k={self.bptt_k}]")
        _check(o, "gate_entropy", self.gate_entropy,
               isinstance(self.gate_entropy, int | float) and self.gate_entropy >= 0, "a number >= 0")

    def sample(self, generator: torch.Generator | None = None) -> int:
        """One draw of r (use `sampling.recur_generator(seed, step)` so every rank and every resume agree)."""
        return int(sample_num_recur(self.mean, self.sigma, self.r_max, generator))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- exit criteria
class ExitCriterion:
    """Decides, after each recurrence of a decoded token, whether that token has converged.

    `converged(s_prev, s_new, logp_prev, logp_new, threshold, gate)` gets the rows still recurring: states before and
    after this recurrence (N, D), and, when `uses_logits`, the next-token log-probabilities after the previous and this
    recurrence (N, V; `logp_prev` is None at the first recurrence); when `uses_gate`, the model's exit-gate probability
    after this recurrence (N,). `threshold` is (N,): rows with different thresholds share one call. Returns a bool (N,).
    """

    name: ClassVar[str]
    uses_logits: ClassVar[bool] = False
    uses_gate: ClassVar[bool] = False  # needs a model with a trained exit gate (GPTConfig.exit_gate)
    description: ClassVar[str]

    def converged(self, s_prev: torch.Tensor, s_new: torch.Tensor, logp_prev: torch.Tensor | None,
                  logp_new: torch.Tensor | None, threshold: torch.Tensor,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class LatentExit(ExitCriterion):
    name = "latent"
    description = "relative change of the state |s_i - s_{i-1}| / |s_i| below the threshold"

    def converged(self, s_prev, s_new, logp_prev, logp_new, threshold, gate=None):
        # linalg.vector_norm: Tensor.norm's Python dispatch costs as much as the reduction at decode sizes
        vnorm = torch.linalg.vector_norm
        return vnorm(s_new - s_prev, dim=-1) / vnorm(s_new, dim=-1).clamp_min(1e-12) < threshold


class KLExit(ExitCriterion):
    name = "kl"
    uses_logits = True
    description = "KL(p_i || p_{i-1}) of successive next-token distributions below the threshold"

    def converged(self, s_prev, s_new, logp_prev, logp_new, threshold, gate=None):
        if logp_prev is None:  # nothing to compare with after the first recurrence
            return torch.zeros(s_new.size(0), dtype=torch.bool, device=s_new.device)
        kl = (logp_new.exp() * (logp_new - logp_prev)).sum(-1)
        return kl < threshold


class LearnedExit(ExitCriterion):
    name = "learned"
    uses_gate = True
    description = "the model's trained exit gate: probability of stopping after this recurrence above the threshold"

    def converged(self, s_prev, s_new, logp_prev, logp_new, threshold, gate=None):
        if gate is None:
            raise ValueError("exit criterion 'learned' needs a model with an exit gate (GPTConfig.exit_gate=true)")
        return gate > threshold


# The one registry of criteria: validators and `--help` texts read it.
EXIT_CRITERIA: dict[str, ExitCriterion] = {c.name: c() for c in (LatentExit, KLExit, LearnedExit)}


@dataclass(frozen=True, kw_only=True)
class ExitRule:
    """Adaptive exit: a token stops recurring once `criterion` says it converged, but never before `min_recur`."""

    criterion: str = "latent"  # a name in EXIT_CRITERIA
    threshold: float = 5e-4  # meaning depends on the criterion (see EXIT_CRITERIA[...].description)
    min_recur: int = 1  # never exit before this many recurrences

    def __post_init__(self) -> None:
        o = "ExitRule"
        _check(o, "criterion", self.criterion, self.criterion in EXIT_CRITERIA, f"one of {sorted(EXIT_CRITERIA)}")
        _check(o, "threshold", self.threshold, isinstance(self.threshold, int | float) and self.threshold >= 0,
               "a number >= 0")
        _check(o, "min_recur", self.min_recur, _is_int(self.min_recur) and 1 <= self.min_recur <= MAX_RECUR,
               f"an int in [1, {MAX_RECUR}]")

    @property
    def impl(self) -> ExitCriterion:
        return EXIT_CRITERIA[self.criterion]

    _SPEC = re.compile(r"^([a-z_]+):([0-9.eE+-]+)(?::(\d+))?$")

    @classmethod
    def parse(cls, spec: str) -> ExitRule:
        """'kl:5e-4' or 'latent:1e-3:2' (criterion:threshold[:min_recur])."""
        m = cls._SPEC.match(spec.strip())
        if not m:
            raise ValueError(f"exit rule {spec!r} is not criterion:threshold[:min_recur]; "
                             f"criteria {sorted(EXIT_CRITERIA)}")
        try:
            threshold = float(m.group(2))
        except ValueError:
            raise ValueError(f"exit rule {spec!r}: threshold {m.group(2)!r} is not a number") from None
        return cls(criterion=m.group(1), threshold=threshold, min_recur=int(m.group(3) or 1))

    def __str__(self) -> str:
        return f"{self.criterion}:{self.threshold:g}" + (f":{self.min_recur}" if self.min_recur > 1 else "")


# ------------------------------------------------------------------------------------------------- KV strategies
_KV_RE = re.compile(r"^(exact|final|ring:(\d+))$")


def parse_kv_cache(spec: str) -> tuple[str, int | None]:
    """'exact' -> ('exact', None); 'final' -> ('ring', 1); 'ring:k' -> ('ring', k)."""
    m = _KV_RE.match(spec) if isinstance(spec, str) else None
    if not m:
        raise ValueError(f"kv_cache={spec!r} is not a KV cache strategy; allowed 'exact', 'final', 'ring:K' (K >= 1)")
    if spec == "exact":
        return "exact", None
    if spec == "final":
        return "ring", 1
    k = int(m.group(2))
    if k < 1:
        raise ValueError(f"kv_cache={spec!r}: ring size must be >= 1")
    return "ring", k


# ------------------------------------------------------------------------------------------------ decode settings
@dataclass(frozen=True, kw_only=True)
class DecodeSettings:
    """How one sequence is decoded. Frozen and hashable: it travels unchanged from the request to the model.

    `num_recur` is the budget: the most recurrences any token of the sequence runs. Prompt tokens run the full budget,
    except the last one in the engines: its output is the first generated token, so like every token that is sampled
    from it follows the `exit` rule (a one-token answer can exit early).
    """

    num_recur: int = 4  # recurrences per token (the most, with an exit rule)
    kv_cache: str = "exact"  # exact | ring:K | final (= ring:1), see kv_cache.py
    exit: ExitRule | None = None  # adaptive exit; None = every token runs num_recur recurrences
    warm_start: bool = False  # a generated token's s0 is the previous token's final state

    def __post_init__(self) -> None:
        o = "DecodeSettings"
        _check(o, "num_recur", self.num_recur, _is_int(self.num_recur) and 1 <= self.num_recur <= MAX_RECUR,
               f"an int in [1, {MAX_RECUR}]")
        parse_kv_cache(self.kv_cache)
        _check(o, "exit", self.exit, self.exit is None or isinstance(self.exit, ExitRule), "an ExitRule or None")
        _check(o, "warm_start", self.warm_start, isinstance(self.warm_start, bool), "true or false")

    def replace(self, **changes: Any) -> DecodeSettings:
        return dataclasses.replace(self, **changes)

    @property
    def label(self) -> str:
        """Short human label: 'r8', 'r16 kl:0.0005', 'r4 ring:2 warm'."""
        parts = [f"r{self.num_recur}"]
        if self.kv_cache != "exact":
            parts.append(self.kv_cache)
        if self.exit is not None:
            parts.append(str(self.exit))
        if self.warm_start:
            parts.append("warm")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodeSettings:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DecodeSettings: unknown field(s) {unknown}; known fields: {sorted(known)}")
        if isinstance(d.get("exit"), dict):
            d["exit"] = ExitRule(**d["exit"])
        elif isinstance(d.get("exit"), str):
            d["exit"] = ExitRule.parse(d["exit"])
        return cls(**d)


def exit_help() -> str:
    """One line per registered criterion, for CLI and API docs."""
    return "; ".join(f"{name}: {c.description}" for name, c in EXIT_CRITERIA.items())


