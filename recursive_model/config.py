"""GPTConfig: the one typed config of the recursive GPT, with named presets.

A recursive GPT is prelude (n_prelude layers) -> recurrent block (n_recur layers applied r times) -> coda (n_coda
layers). Effective depth is n_prelude + n_recur * r + n_coda. With n_recur = 0 it is a plain GPT.
Recurrence settings are typed sub-configs from recurrence.py: `recurrence` (the training draw of r, truncated BPTT)
and `decode` (the default DecodeSettings a caller starts from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .recurrence import DecodeSettings, ExitRule, RecurrenceSampling, parse_kv_cache

INJECT_MODES = ("concat_linear", "add")
STATE_INITS = ("embed", "zeros", "noise")

__all__ = ["GPTConfig", "PRESETS", "INJECT_MODES", "STATE_INITS", "parse_kv_cache"]


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError naming the field, the value and the allowed range."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"GPTConfig.{name}={value!r} is out of range; allowed {rng}")


@dataclass
class GPTConfig:
    """Architecture, recurrence-training and default decode settings of a recursive GPT."""

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
    # Causal attention window of the prelude and recurrent layers, in tokens (a query sees itself and the window-1
    # tokens before it); 0 = the whole context. A local window bounds how far information travels per layer, so
    # reaching further back takes more recurrences: a recurrent block trained on short problems then solves longer
    # ones by recurring longer (walk task: 94 % on 5-8 moves at r=16 after training on 1-4, 10 % at r=2; with full
    # attention nothing extrapolated; docs/LOG.md 2026-12-03).
    attn_window: int = 0
    # The coda's window (it reads the answer out of the final states, which may sit further back than one layer's
    # reach); None = attn_window, 0 = the whole context.
    coda_window: int | None = None
    inject_mode: str = "concat_linear"  # how the prelude output e enters each recurrence: concat_linear | add
    state_init: str = "embed"  # initial state s0: embed (s0 = e) | zeros | noise (truncated normal, var 2/5)
    # A learned per-token exit gate (Linear(D -> 1) on the state after each recurrence), trained beside the LM loss
    # (see GPT.forward) and read by the 'learned' exit criterion at decode time.
    exit_gate: bool = False
    # --- recurrence ---
    recurrence: RecurrenceSampling = field(default_factory=RecurrenceSampling)  # training draw of r, bptt_k
    decode: DecodeSettings = field(default_factory=DecodeSettings)  # what eval and decode use unless told otherwise
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        if isinstance(self.recurrence, dict):
            self.recurrence = RecurrenceSampling(**self.recurrence)
        if isinstance(self.decode, dict):
            self.decode = DecodeSettings.from_dict(self.decode)
        for name in ("vocab_size", "sequence_len", "n_embd", "n_head", "n_kv_head"):
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
        for name in ("attn_window", "coda_window"):
            value = getattr(self, name)
            if value is None and name == "coda_window":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"GPTConfig.{name}={value!r} must be an int (tokens; 0 = whole context)")
            _check_range(name, value, lo=0)
        if self.inject_mode not in INJECT_MODES:
            raise ValueError(f"GPTConfig.inject_mode={self.inject_mode!r}; allowed {INJECT_MODES}")
        if self.state_init not in STATE_INITS:
            raise ValueError(f"GPTConfig.state_init={self.state_init!r}; allowed {STATE_INITS}")
        if not isinstance(self.exit_gate, bool):
            raise ValueError(f"GPTConfig.exit_gate={self.exit_gate!r} must be true or false")
        if self.exit_gate and not self.is_recursive:
            raise ValueError("GPTConfig.exit_gate=true needs a recurrent block (n_recur >= 1)")
        if not isinstance(self.recurrence, RecurrenceSampling):
            raise ValueError(f"GPTConfig.recurrence={self.recurrence!r} must be a RecurrenceSampling")
        if not isinstance(self.decode, DecodeSettings):
            raise ValueError(f"GPTConfig.decode={self.decode!r} must be a DecodeSettings")
        if self.decode.exit is not None and self.decode.exit.impl.uses_gate and not self.exit_gate:
            raise ValueError(f"GPTConfig.decode.exit={self.decode.exit} needs exit_gate=true")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def windows(self) -> tuple[int, int, int]:
        """Attention window (tokens, 0 = whole context) of the prelude, recurrent and coda layers."""
        coda = self.attn_window if self.coda_window is None else self.coda_window
        return self.attn_window, self.attn_window, coda

    @property
    def is_recursive(self) -> bool:
        return self.n_recur > 0

    def effective_depth(self, num_recur: int | None = None) -> int:
        """Layers a token passes through: P + R * r + C."""
        r = self.decode.num_recur if num_recur is None else num_recur
        return self.n_prelude + self.n_recur * (r if self.is_recursive else 0) + self.n_coda

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict (as to_dict writes it); unknown keys are an error naming them.

        Flat recurrence keys of format-1 checkpoints (`train_recur_mean`, `eval_recur`, `exit_criterion`, ...) are
        read into the sub-configs, so older checkpoints keep loading.
        """
        d = _migrate_flat_keys(dict(d))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see PRESETS) with optional field overrides (sub-configs as objects or dicts)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
        for key in ("recurrence", "decode"):  # a partial sub-config dict overrides only the keys it names
            if isinstance(overrides.get(key), dict):
                overrides[key] = {**base.get(key, {}), **overrides[key]}
        return cls.from_dict({**base, **overrides})


# Format-1 flat names -> (sub-config, field) of the current layout.
_FLAT_KEYS = {
    "train_recur_mean": ("recurrence", "mean"), "train_recur_max": ("recurrence", "r_max"),
    "recur_sigma": ("recurrence", "sigma"), "bptt_k": ("recurrence", "bptt_k"),
    "eval_recur": ("decode", "num_recur"), "kv_cache": ("decode", "kv_cache"),
    "recur_warm_start": ("decode", "warm_start"),
}
_FLAT_EXIT = ("exit_criterion", "exit_threshold", "exit_min_recur")


def _migrate_flat_keys(d: dict[str, Any]) -> dict[str, Any]:
    if not any(k in d for k in (*_FLAT_KEYS, *_FLAT_EXIT)):
        return d
    subs = {"recurrence": _as_dict(d.get("recurrence")), "decode": _as_dict(d.get("decode"))}
    for old, (sub, new) in _FLAT_KEYS.items():
        if old in d:
            subs[sub][new] = d.pop(old)
    criterion = d.pop("exit_criterion", "none")
    threshold, min_recur = d.pop("exit_threshold", 5e-4), d.pop("exit_min_recur", 1)
    if criterion != "none":
        subs["decode"]["exit"] = ExitRule(criterion=criterion, threshold=threshold, min_recur=min_recur)
    return {**d, **subs}


def _as_dict(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    return dict(v) if isinstance(v, dict) else {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}


def _rec(mean: float, r_max: int, bptt_k: int, sigma: float = 0.5) -> dict[str, Any]:
    return dict(mean=mean, r_max=r_max, bptt_k=bptt_k, sigma=sigma)


# The one place that lists the presets.
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward+backward in milliseconds on 2 CPU cores.
    "tiny": dict(vocab_size=512, sequence_len=64, n_embd=32, n_head=4, n_kv_head=2, n_prelude=1, n_recur=2, n_coda=1,
                 recurrence=_rec(2.0, 4, 2), decode=dict(num_recur=2)),
    # A small full-attention model for CPU benchmarks (decode, continuous batching, serving load).
    "cpu-small": dict(vocab_size=4096, sequence_len=256, n_embd=128, n_head=4, n_kv_head=4, n_prelude=1, n_recur=2,
                      n_coda=1, recurrence=_rec(3.0, 8, 3), decode=dict(num_recur=3)),
    # The embedded default's model (pipeline preset cpu-small): the depth recipe at CPU scale (README, "The depth
    # recipe"). One layer each for prelude, recurrent block and coda, one 64-wide head, causal windows of 3 tokens
    # (coda 4), so reaching further back takes more recurrences; r ~ Poisson log-normal with mean 8 up to 16, gradients
    # through 8 of them, loss on the last 2, an exit gate; decodes up to r = 16 with the kl exit at 1e-4 (on the
    # default run's walks it kept r = 16's accuracy at a mean of 6-7 recurrences of 16; docs/LOG.md, 2026-12-07).
    "cpu-depth": dict(vocab_size=4096, sequence_len=256, n_embd=64, n_head=1, n_kv_head=1, n_prelude=1, n_recur=1,
                      n_coda=1, attn_window=3, coda_window=4, exit_gate=True,
                      recurrence=dict(mean=8.0, sigma=0.5, r_max=16, bptt_k=8, supervise=2, gate_entropy=0.05),
                      decode=dict(num_recur=16, exit="kl:1e-4")),
    # The reference design: (P, R, C) = (2, 4, 2), r_mean 4 -> effective depth 20, ~328M params.
    "d20-recursive": dict(vocab_size=65536, sequence_len=2048, n_embd=1280, n_head=10, n_kv_head=10, n_prelude=2,
                          n_recur=4, n_coda=2, recurrence=_rec(4.0, 16, 4), decode=dict(num_recur=4)),
    # The iso-FLOP baseline: a plain 20-layer GPT of the same width (~561M params).
    "d20": dict(vocab_size=65536, sequence_len=2048, n_embd=1280, n_head=10, n_kv_head=10, n_prelude=20, n_recur=0,
                n_coda=0, recurrence=_rec(1.0, 1, 1), decode=dict(num_recur=1)),
}
