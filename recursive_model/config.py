"""GPTConfig: the one typed config of the recursive GPT, with named presets.

A recursive GPT is prelude (n_prelude layers) -> recurrent block (n_recur layers applied r times) -> coda (n_coda
layers). Effective depth is n_prelude + n_recur * r + n_coda. With n_recur = 0 it is a plain GPT.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

INJECT_MODES = ("concat_linear", "add")
STATE_INITS = ("embed", "zeros", "noise")
EXIT_CRITERIA = ("none", "kl", "latent")
_KV_RE = re.compile(r"^(exact|final|ring:(\d+))$")


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError naming the field, the value and the allowed range."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"GPTConfig.{name}={value!r} is out of range; allowed {rng}")


def parse_kv_cache(spec: str) -> tuple[str, int | None]:
    """'exact' -> ('exact', None); 'final' -> ('ring', 1); 'ring:k' -> ('ring', k)."""
    m = _KV_RE.match(spec)
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


@dataclass
class GPTConfig:
    """Architecture, recurrence-training and inference settings of a recursive GPT."""

    # --- shape ---
    vocab_size: int = 65536  # tokenizer vocabulary incl. special tokens
    sequence_len: int = 2048  # maximum context length (rotary table size)
    n_embd: int = 1280  # model width D
    n_head: int = 10  # query heads; head_dim = n_embd / n_head
    n_kv_head: int = 10  # key/value heads (GQA when < n_head)
    n_prelude: int = 2  # P: layers applied once before the recurrence
    n_recur: int = 4  # R: layers of the recurrent block (0 = plain GPT)
    n_coda: int = 2  # C: layers applied once after the recurrence
    softcap: float = 15.0  # logit soft-cap (nanochat); 0 disables
    # --- recurrence during training ---
    train_recur_mean: float = 4.0  # mean r of the Poisson log-normal draw (exact mean, not mean+1)
    train_recur_max: int = 16  # r is clamped to [1, train_recur_max]
    recur_sigma: float = 0.5  # log-normal sigma of the rate
    bptt_k: int = 4  # gradients flow through the last k recurrences only
    inject_mode: str = "concat_linear"  # how the prelude output e enters each recurrence: concat_linear | add
    state_init: str = "embed"  # initial state s0: embed (s0 = e) | zeros | noise (truncated normal, var 2/5)
    # --- inference ---
    eval_recur: int = 4  # r used when a caller gives none (eval, decode)
    recur_warm_start: bool = False  # decode: a token's s0 is the previous token's final state
    kv_cache: str = "exact"  # exact | ring:K | final (one slot: only the final recurrence kept)
    exit_criterion: str = "none"  # adaptive exit: none | kl | latent
    exit_threshold: float = 5e-4  # kl: KL(p_i || p_{i-1}) below this; latent: |s_i - s_{i-1}| / |s_i| below this
    exit_min_recur: int = 1  # never exit before this many recurrences
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        for name in ("vocab_size", "sequence_len", "n_embd", "n_head", "n_kv_head", "train_recur_max", "bptt_k",
                     "eval_recur", "exit_min_recur"):
            _check_range(name, getattr(self, name), lo=1)
        for name in ("n_prelude", "n_recur", "n_coda"):
            _check_range(name, getattr(self, name), lo=0)
        if self.n_prelude + self.n_recur + self.n_coda == 0:
            raise ValueError("GPTConfig: n_prelude + n_recur + n_coda must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head_dim={self.n_embd // self.n_head} must be even (rotary embeddings)")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        _check_range("softcap", self.softcap, lo=0)
        _check_range("train_recur_mean", self.train_recur_mean, lo=1, hi=self.train_recur_max)
        _check_range("recur_sigma", self.recur_sigma, lo=0)
        if self.recur_sigma <= 0:
            raise ValueError(f"GPTConfig.recur_sigma={self.recur_sigma} must be > 0")
        _check_range("exit_threshold", self.exit_threshold, lo=0)
        if self.inject_mode not in INJECT_MODES:
            raise ValueError(f"GPTConfig.inject_mode={self.inject_mode!r}; allowed {INJECT_MODES}")
        if self.state_init not in STATE_INITS:
            raise ValueError(f"GPTConfig.state_init={self.state_init!r}; allowed {STATE_INITS}")
        if self.exit_criterion not in EXIT_CRITERIA:
            raise ValueError(f"GPTConfig.exit_criterion={self.exit_criterion!r}; allowed {EXIT_CRITERIA}")
        parse_kv_cache(self.kv_cache)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_recursive(self) -> bool:
        return self.n_recur > 0

    def effective_depth(self, num_recur: int | None = None) -> int:
        """Layers a token passes through: P + R * r + C."""
        r = self.eval_recur if num_recur is None else num_recur
        return self.n_prelude + self.n_recur * (r if self.is_recursive else 0) + self.n_coda

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see PRESETS) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# The one place that lists the presets.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward+backward in milliseconds on 2 CPU cores.
    "tiny": dict(vocab_size=512, sequence_len=64, n_embd=32, n_head=4, n_kv_head=2, n_prelude=1, n_recur=2, n_coda=1,
                 train_recur_mean=2.0, train_recur_max=4, bptt_k=2, eval_recur=2),
    # The embedded default demo: trains for a few minutes on 2 CPU cores on the shipped corpus.
    "cpu-small": dict(vocab_size=4096, sequence_len=256, n_embd=128, n_head=4, n_kv_head=4, n_prelude=1, n_recur=2,
                      n_coda=1, train_recur_mean=3.0, train_recur_max=8, bptt_k=3, eval_recur=3),
    # The reference design: (P, R, C) = (2, 4, 2), r_mean 4 -> effective depth 20, ~328M params.
    "d20-recursive": dict(vocab_size=65536, sequence_len=2048, n_embd=1280, n_head=10, n_kv_head=10, n_prelude=2,
                          n_recur=4, n_coda=2, train_recur_mean=4.0, train_recur_max=16, bptt_k=4, eval_recur=4),
    # The iso-FLOP baseline: a plain 20-layer GPT of the same width (~561M params).
    "d20": dict(vocab_size=65536, sequence_len=2048, n_embd=1280, n_head=10, n_kv_head=10, n_prelude=20, n_recur=0,
                n_coda=0, train_recur_mean=1.0, train_recur_max=1, bptt_k=1, eval_recur=1),
}
