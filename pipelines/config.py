"""PipelineConfig: the one typed config of a pipeline run (tokenizer -> pretrain -> mid -> sft -> eval).

YAML files map 1:1 onto these dataclasses; unknown fields and bad values raise ConfigError naming the field path
(e.g. `stages[1].lr`). `rnc config show --preset NAME` prints the effective config of a preset as YAML, and that YAML
is accepted back by `rnc pipeline run --config FILE`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recursive_model.config import GPTConfig

from .storage import StorageConfig

STAGE_KINDS = ("pretrain", "mid", "sft")
ALL_STAGES = ("tokenizer", "pretrain", "mid", "sft", "eval")
# Peak dense bf16 FLOP/s per device for MFU; the CPU figure is a rough 2-core AVX2 fp32 number.
PEAK_FLOPS = {"h100": 989e12, "a100": 312e12, "l4": 121e12, "cpu": 2e11}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field path, the value and what is allowed."""


@dataclass
class ScalingSpec:
    """Ray Train workers for each training stage."""

    num_workers: int = 1  # DDP ranks (gloo on CPU, NCCL on GPU)
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = 1.0  # fractional values avoid oversubscribing small machines
    gpus_per_worker: float = 1.0  # only used with use_gpu

    def validate(self, path: str) -> None:
        _require(self.num_workers >= 1, f"{path}.num_workers", self.num_workers, ">= 1")
        _require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", self.cpus_per_worker, "> 0")
        _require(self.gpus_per_worker > 0, f"{path}.gpus_per_worker", self.gpus_per_worker, "> 0")


@dataclass
class TokenizerSpec:
    """Tokenizer training (vocab size comes from the model config)."""

    corpus: str = "shipped"  # corpus preset or source (see recursive_model.corpus)
    max_chars: int = 20_000_000  # characters of the corpus used for BPE training

    def validate(self, path: str) -> None:
        _require(self.max_chars >= 1000, f"{path}.max_chars", self.max_chars, ">= 1000")


@dataclass
class StageConfig:
    """One training stage. pretrain, mid and sft share the loop and differ only in these values."""

    name: str = "pretrain"  # pretrain | mid | sft
    data: str = "shipped"  # pretrain: corpus preset/source; mid/sft: mixture preset (recursive_model.tasks)
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    optimizer: str = "adamw"  # adamw | muon (Muon for matrices, AdamW for embeddings and head, as nanochat)
    lr: float = 3e-3  # matrix learning rate (AdamW) or Muon lr
    embedding_lr: float = 3e-2  # token embedding learning rate
    head_lr: float = 3e-3  # lm_head learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warmup
    warmdown_frac: float = 0.3  # last fraction of steps decays linearly to final_lr_frac
    final_lr_frac: float = 0.05
    grad_clip: float = 1.0  # 0 disables
    recur_mean: float | None = None  # None -> model.train_recur_mean (recurrence sampling per stage)
    recur_max: int | None = None  # None -> model.train_recur_max
    recur_sigma: float | None = None  # None -> model.recur_sigma
    bptt_k: int | None = None  # None -> model.bptt_k
    eval_every: int = 50  # validation bits-per-byte every N steps (and at the end)
    eval_batches: int = 4
    eval_recur: list[int] = field(default_factory=list)  # r values for validation; empty -> [model.eval_recur]
    checkpoint_every: int = 50  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept per stage (the final one is always the newest)
    log_every: int = 10

    def validate(self, path: str) -> None:
        _require(self.name in STAGE_KINDS, f"{path}.name", self.name, f"one of {STAGE_KINDS}")
        for f in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_last",
            "log_every",
        ):
            _require(getattr(self, f) >= 1, f"{path}.{f}", getattr(self, f), ">= 1")
        _require(self.optimizer in ("adamw", "muon"), f"{path}.optimizer", self.optimizer, "'adamw' or 'muon'")
        for f in ("lr", "embedding_lr", "head_lr"):
            _require(0 < getattr(self, f) < 10, f"{path}.{f}", getattr(self, f), "(0, 10)")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, ">= 0")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, ">= 0")
        _require(0 <= self.warmdown_frac <= 1, f"{path}.warmdown_frac", self.warmdown_frac, "[0, 1]")
        _require(0 <= self.final_lr_frac <= 1, f"{path}.final_lr_frac", self.final_lr_frac, "[0, 1]")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", self.grad_clip, ">= 0")
        for r in self.eval_recur:
            _require(isinstance(r, int) and r >= 1, f"{path}.eval_recur", self.eval_recur, "integers >= 1")

    def model_config(self, base: GPTConfig) -> GPTConfig:
        """The model config with this stage's recurrence-sampling overrides applied."""
        over = {
            k: v
            for k, v in (
                ("train_recur_mean", self.recur_mean),
                ("train_recur_max", self.recur_max),
                ("recur_sigma", self.recur_sigma),
                ("bptt_k", self.bptt_k),
            )
            if v is not None
        }
        return dataclasses.replace(base, **over) if over else base


@dataclass
class EvalSpec:
    """The eval stage: tasks x recurrences on the final checkpoint."""

    tasks: list[str] = field(default_factory=lambda: ["reasoning", "arithmetic", "spelling_bee"])
    recurrences: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    adaptive: str | None = None  # e.g. "kl:5e-4" or "latent:1e-3"
    max_problems: int = 50  # per task
    max_tokens: int = 32
    batch_size: int = 16

    def validate(self, path: str) -> None:
        from recursive_model.evaluation import check_task_names, parse_adaptive

        try:  # a typo in the eval spec fails before hours of training, not after
            check_task_names(self.tasks)
            if self.adaptive:
                parse_adaptive(self.adaptive)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        _require(len(self.recurrences) > 0, f"{path}.recurrences", self.recurrences, "a non-empty list")
        for r in self.recurrences:
            _require(isinstance(r, int) and r >= 1, f"{path}.recurrences", self.recurrences, "integers >= 1")
        _require(self.max_problems >= 1, f"{path}.max_problems", self.max_problems, ">= 1")
        _require(self.max_tokens >= 1, f"{path}.max_tokens", self.max_tokens, ">= 1")


@dataclass
class WandbSpec:
    """Weights & Biases logging: offline unless WANDB_API_KEY is set (or mode is given)."""

    project: str = "recursive-nanochat"
    mode: str | None = None  # online | offline | disabled; None -> online with WANDB_API_KEY, else offline
    dir: str | None = None  # None -> <storage>/<run>/wandb for local storage, else ~/.cache/rnc/wandb

    def resolved_mode(self) -> str:
        """mode, else WANDB_MODE, else online with WANDB_API_KEY set, else offline."""
        if self.mode:
            return self.mode
        if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def validate(self, path: str) -> None:
        ok = self.mode in (None, "online", "offline", "disabled")
        _require(ok, f"{path}.mode", self.mode, "online | offline | disabled")


@dataclass
class PipelineConfig:
    """A whole pipeline run."""

    run_name: str = "cpu-small"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "cpu-small"})  # preset + GPTConfig overrides
    storage: StorageConfig = field(default_factory=lambda: StorageConfig(uri="./runs"))  # local path or s3://
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)
    seed: int = 42  # data order, recurrence draws (per step), init
    device_peak_flops: float | None = None  # None -> by device (PEAK_FLOPS)
    max_failures: int = 2  # Ray Train worker-group restarts per stage
    log_progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require(bool(self.run_name) and "/" not in self.run_name, "run_name", self.run_name, "a name without '/'")
        self.gpt_config()  # raises ConfigError naming model.<field>
        self.tokenizer.validate("tokenizer")
        self.eval.validate("eval")
        self.scaling.validate("scaling")
        self.wandb.validate("wandb")
        names = [s.name for s in self.stages]
        _require(len(set(names)) == len(names), "stages", names, "each stage name at most once")
        for i, s in enumerate(self.stages):
            s.validate(f"stages[{i}]")
            try:
                s.model_config(self.gpt_config())
            except ValueError as exc:
                raise ConfigError(f"stages[{i}] ({s.name}): {exc}") from exc
        _require(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")

    def gpt_config(self) -> GPTConfig:
        """The model config: preset plus overrides."""
        over = dict(self.model)
        preset = over.pop("preset", None)
        try:
            return GPTConfig.from_preset(preset, **over) if preset else GPTConfig.from_dict(over)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model: {exc}") from exc

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"stage {name!r} is not configured; configured: {[s.name for s in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PipelineConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
        base = data.pop("preset", None)
        return cls.from_preset(base, **data) if base else cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PipelineConfig:
        """A named pipeline preset with top-level overrides (dicts merge one level deep)."""
        if name not in PIPELINE_PRESETS:
            raise ConfigError(f"unknown pipeline preset {name!r}; known presets: {sorted(PIPELINE_PRESETS)}")
        d = copy.deepcopy(PIPELINE_PRESETS[name])
        for k, v in overrides.items():
            d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return cls.from_dict(d)


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is invalid; allowed: {allowed}")


def _build(cls: type, d: Any, path: str) -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses and lists of them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown field(s) {[where + u for u in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}={value!r} must be of type {tp.__name__}")
    return value


def _cpu_small() -> dict[str, Any]:
    """The embedded default: the whole DAG on 2 CPU cores in well under 10 minutes."""
    common = dict(batch_size=8, eval_batches=4, eval_recur=[1, 3, 6], log_every=10)
    return dict(
        run_name="cpu-small",
        model={"preset": "cpu-small"},
        tokenizer={"corpus": "shipped", "max_chars": 3_000_000},
        stages=[
            dict(
                name="pretrain",
                data="shipped",
                steps=300,
                lr=6e-3,
                embedding_lr=6e-2,
                head_lr=6e-3,
                warmup_steps=20,
                eval_every=100,
                checkpoint_every=100,
                **common,
            ),
            dict(
                name="mid",
                data="mid-cpu",
                steps=150,
                lr=3e-3,
                embedding_lr=3e-2,
                head_lr=3e-3,
                warmup_steps=0,
                eval_every=75,
                checkpoint_every=75,
                **common,
            ),
            dict(
                name="sft",
                data="sft-cpu",
                steps=150,
                lr=2e-3,
                embedding_lr=2e-2,
                head_lr=2e-3,
                warmup_steps=0,
                eval_every=75,
                checkpoint_every=75,
                **common,
            ),
        ],
        eval=dict(
            tasks=["reasoning", "reasoning_hard", "arithmetic", "spelling_bee"],
            recurrences=[1, 2, 3, 6],
            max_problems=40,
            max_tokens=24,
        ),
        scaling=dict(num_workers=1, cpus_per_worker=2.0),  # one worker using both cores beats two DDP ranks
    )


def _tiny() -> dict[str, Any]:
    """Tests: seconds per stage."""
    d = _cpu_small()
    common = dict(
        steps=6,
        batch_size=2,
        eval_every=3,
        eval_batches=1,
        checkpoint_every=3,
        keep_last=2,
        log_every=2,
        warmup_steps=1,
        eval_recur=[1, 2],
    )
    d.update(
        run_name="tiny",
        model={"preset": "tiny", "vocab_size": 300},
        tokenizer={"corpus": "shipped", "max_chars": 200_000},
        stages=[
            dict(name="pretrain", data="shipped", **common),
            dict(name="mid", data="mid-cpu", **common),
            dict(name="sft", data="sft-cpu", **common),
        ],
        eval=dict(tasks=["reasoning", "arithmetic"], recurrences=[1, 2], max_problems=4, max_tokens=8),
        scaling=dict(num_workers=1, cpus_per_worker=0.5),
    )
    return d


def _d20(preset: str) -> dict[str, Any]:
    """A real GPU run (8 GPUs), nanochat-sized: FineWeb-edu pretraining, SmolTalk-based mid and SFT mixtures."""
    return dict(
        run_name=preset,
        model={"preset": preset},
        storage={"uri": "s3://change-me/rnc-runs"},
        tokenizer={"corpus": "fineweb-edu", "max_chars": 2_000_000_000},
        stages=[
            dict(
                name="pretrain",
                data="fineweb-edu",
                steps=21400,
                batch_size=32,
                optimizer="muon",
                lr=0.02,
                embedding_lr=0.2,
                head_lr=0.004,
                warmup_steps=0,
                warmdown_frac=0.2,
                eval_every=250,
                eval_batches=40,
                eval_recur=[1, 4, 8, 16],
                checkpoint_every=1000,
                keep_last=3,
            ),
            dict(
                name="mid",
                data="mid-real",
                steps=800,
                batch_size=32,
                optimizer="muon",
                lr=0.02,
                embedding_lr=0.2,
                head_lr=0.004,
                warmup_steps=0,
                eval_every=200,
                checkpoint_every=400,
            ),
            dict(
                name="sft",
                data="sft-real",
                steps=700,
                batch_size=4,
                grad_accum=8,
                optimizer="muon",
                lr=0.004,
                embedding_lr=0.04,
                head_lr=0.0008,
                warmup_steps=0,
                eval_every=200,
                checkpoint_every=350,
            ),
        ],
        eval=dict(
            tasks=["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling_bee", "reasoning"],
            recurrences=[1, 2, 4, 8, 16],
            max_problems=500,
            max_tokens=256,
        ),
        scaling=dict(num_workers=8, use_gpu=True, cpus_per_worker=8, gpus_per_worker=1),
    )


# The one place that lists the pipeline presets.
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": _cpu_small(),
    "tiny": _tiny(),
    "d20-recursive": _d20("d20-recursive"),
    "d20": _d20("d20"),
}
