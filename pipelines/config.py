"""PipelineConfig: the one typed config of a pipeline run (tokenizer -> pretrain -> mid -> sft -> eval).

Pydantic models on the shared conventions of recursive_model/yaml_config.py: YAML files map 1:1 onto them; unknown
fields and bad values raise ConfigError naming the field path (e.g. `stages[1].lr`). `rnc config show --preset NAME`
prints the effective config of a preset as YAML, and that YAML is accepted back by `rnc pipeline run --config FILE`.
"""

from __future__ import annotations

import copy
import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from checkpoints import StorageConfig
from recursive_model.config import GPTConfig
from recursive_model.recurrence import ExitRule, RecurrenceSampling
from recursive_model.yaml_config import ConfigError, DataclassField, StrictModel, build, read_yaml_mapping

PositiveInt = Annotated[int, Field(ge=1)]
STAGE_KINDS = ("pretrain", "mid", "sft")
ALL_STAGES = ("tokenizer", "pretrain", "mid", "sft", "eval")

__all__ = ["ConfigError", "PipelineConfig", "StageConfig", "EvalSpec", "ScalingSpec", "TokenizerSpec", "WandbSpec",
           "PIPELINE_PRESETS", "STAGE_KINDS", "ALL_STAGES"]


class ScalingSpec(StrictModel):
    """Ray Train workers for each training stage."""

    num_workers: int = Field(1, ge=1, description="DDP ranks (gloo on CPU, NCCL on GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker when true")
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional values avoid oversubscribing small machines")
    gpus_per_worker: float = Field(1.0, gt=0, description="only used with use_gpu")


class TokenizerSpec(StrictModel):
    """Tokenizer training (vocab size comes from the model config)."""

    corpus: str = Field("shipped", description="corpus preset or source (see recursive_model.corpus)")
    max_chars: int = Field(20_000_000, ge=1000, description="characters of the corpus used for BPE training")


class StageConfig(StrictModel):
    """One training stage. pretrain, mid and sft share the loop and differ only in these values."""

    name: Literal["pretrain", "mid", "sft"] = "pretrain"
    data: str = Field("shipped", description="pretrain: corpus preset/source; mid/sft: mixture preset (tasks)")
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw | muon (Muon for matrices, AdamW for embeddings and head, as nanochat)"
    )
    lr: float = Field(3e-3, gt=0, lt=10, description="matrix learning rate (AdamW) or Muon lr")
    embedding_lr: float = Field(3e-2, gt=0, lt=10, description="token embedding learning rate")
    head_lr: float = Field(3e-3, gt=0, lt=10, description="lm_head learning rate")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0, description="linear warmup")
    warmdown_frac: float = Field(0.3, ge=0, le=1, description="last fraction of steps decays linearly to final_lr_frac")
    final_lr_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables")
    recurrence: DataclassField(RecurrenceSampling) | None = Field(
        None,
        description="the draw of r and truncated BPTT in this stage; None: the model's. A partial mapping "
        "(e.g. {bptt_k: 1}) overrides only the keys it names, on top of the model's",
    )
    eval_every: int = Field(50, ge=1, description="validation bits-per-byte every N steps (and at the end)")
    eval_batches: int = Field(4, ge=1)
    eval_recur: list[PositiveInt] = Field(
        default_factory=list, description="r values for validation; empty: [model.decode.num_recur]"
    )
    checkpoint_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept per stage (the final one is always the newest)")
    log_every: int = Field(10, ge=1)

    def recurrence_for(self, model: GPTConfig) -> RecurrenceSampling:
        """The recurrence sampling this stage trains with: its own, else the model's."""
        return self.recurrence if self.recurrence is not None else model.recurrence


class EvalSpec(StrictModel):
    """The eval stage: tasks x recurrences on the final checkpoint."""

    tasks: list[str] = Field(default_factory=lambda: ["reasoning", "arithmetic", "spelling_bee"])
    recurrences: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    adaptive: DataclassField(ExitRule, parse=ExitRule.parse, dump=str) | None = Field(
        None, description="also decode at max r with this exit rule: 'kl:5e-4[:min_recur]' or a mapping"
    )
    max_problems: int = Field(50, ge=1, description="per task")
    max_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from recursive_model.evaluation import check_task_names

        check_task_names(tasks)  # a typo in the eval spec fails before hours of training, not after
        return tasks


class WandbSpec(StrictModel):
    """Weights & Biases logging: offline unless WANDB_API_KEY is set (or mode is given)."""

    project: str = "recursive-nanochat"
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: online with WANDB_API_KEY, else offline"
    )
    dir: str | None = Field(None, description="None: <storage>/<run>/wandb for local storage, else ~/.cache/rnc/wandb")

    def resolved_mode(self) -> str:
        """mode, else WANDB_MODE, else online with WANDB_API_KEY set, else offline."""
        if self.mode:
            return self.mode
        if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class PipelineConfig(StrictModel):
    """A whole pipeline run."""

    run_name: str = "cpu-small"
    model: dict[str, Any] = Field(
        default_factory=lambda: {"preset": "cpu-small"}, description="preset + GPTConfig overrides"
    )
    storage: DataclassField(StorageConfig) = Field(
        default_factory=lambda: StorageConfig(uri="./runs"), description="local path or s3://"
    )
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    stages: list[StageConfig] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    seed: int = Field(42, description="data order, recurrence draws (per step), init")
    device_peak_flops: float | None = Field(
        None, gt=0, description="None: by device name (recursive_model.optim.PEAK_FLOPS)"
    )
    max_failures: int = Field(2, ge=0, description="Ray Train worker-group restarts per stage")
    log_progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _complete_stage_recurrence(cls, data: Any) -> Any:
        """A stage's partial `recurrence` mapping completed with the model's values (what the stage would otherwise
        use), so `recurrence: {bptt_k: 1}` changes bptt_k alone."""
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, list):
            return data
        partial = [i for i, s in enumerate(stages) if isinstance(s, dict) and isinstance(s.get("recurrence"), dict)]
        model = data.get("model", cls.model_fields["model"].default_factory())
        if not partial or not isinstance(model, dict):
            return data
        try:
            base = _gpt_config(model).recurrence.to_dict()
        except (ValueError, TypeError):
            return data  # the `model` field reports it
        stages = list(stages)
        for i in partial:
            stages[i] = {**stages[i], "recurrence": {**base, **stages[i]["recurrence"]}}
        return {**data, "stages": stages}

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, name: str) -> str:
        if not name or "/" in name:
            raise ValueError(f"{name!r} is invalid; allowed: a non-empty name without '/'")
        return name

    @field_validator("model")
    @classmethod
    def _check_model(cls, model: dict[str, Any]) -> dict[str, Any]:
        try:
            _gpt_config(model)
        except TypeError as exc:  # e.g. a preset override of a field GPTConfig does not have
            raise ValueError(str(exc)) from None
        return model

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{names!r} is invalid; allowed: each stage name at most once")
        return stages

    def gpt_config(self) -> GPTConfig:
        """The model config: preset plus overrides."""
        try:
            return _gpt_config(self.model)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model: {exc}") from exc

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"stage {name!r} is not configured; configured: {[s.name for s in self.stages]}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        return build(cls, d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PipelineConfig:
        data = read_yaml_mapping(path)
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


def _gpt_config(model: dict[str, Any]) -> GPTConfig:
    """GPTConfig of a `model:` section (ValueError or TypeError naming the field)."""
    over = dict(model)
    preset = over.pop("preset", None)
    return GPTConfig.from_preset(preset, **over) if preset else GPTConfig.from_dict(over)


def _cpu_small() -> dict[str, Any]:
    """The embedded default: the whole DAG on 2 CPU cores in well under 10 minutes, ending in a model whose accuracy
    on walks rises with test-time recurrences and extrapolates to longer walks (README, "The depth recipe")."""
    common = dict(batch_size=8, eval_batches=4, eval_recur=[2, 4, 8], log_every=25)
    return dict(
        run_name="cpu-small",
        model={"preset": "cpu-depth"},
        tokenizer={"corpus": "shipped", "max_chars": 3_000_000},
        stages=[
            dict(
                name="pretrain",
                data="shipped",
                steps=100,
                # Gentle: at 6e-3, 50 steps of text already kept the walks from being learned in 300 steps of mid
                # training (from scratch: 250); at 1.5e-3 they were (docs/LOG.md, 2026-12-07).
                lr=1e-3,
                embedding_lr=1e-2,
                head_lr=1e-3,
                warmup_steps=20,
                eval_every=50,
                checkpoint_every=50,
                # language modelling needs no deep recurrences: half the cost per token of the model's own draw
                recurrence=dict(mean=4.0, bptt_k=4, supervise=1),
                **common,
            ),
            dict(
                name="mid",
                data="mid-cpu",
                steps=600,
                lr=3e-3,
                embedding_lr=3e-2,
                head_lr=3e-3,
                warmup_steps=20,
                eval_every=300,
                checkpoint_every=300,
                **common,
            ),
            dict(
                name="sft",
                data="sft-cpu",
                steps=250,
                lr=2e-3,
                embedding_lr=2e-2,
                head_lr=2e-3,
                warmup_steps=0,
                eval_every=125,
                checkpoint_every=125,
                **common,
            ),
        ],
        eval=dict(
            tasks=["walk", "walk_hard", "arithmetic", "spelling_bee"],
            recurrences=[1, 2, 4, 8, 16],
            adaptive="kl:1e-4",  # the model's decode exit (preset cpu-depth)
            max_problems=200,
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
        eval=dict(tasks=["walk", "arithmetic"], recurrences=[1, 2], max_problems=4, max_tokens=8),
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
                batch_size=16,  # 32 x 2048 tokens per micro-step ran out of memory on one H200 (docs/GPU.md)
                grad_accum=2,
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
                batch_size=16,
                grad_accum=2,
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
