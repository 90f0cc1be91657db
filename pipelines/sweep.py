"""Sweep files: a pipeline config, a search space over its fields, an objective across test-time r, a scheduler.

This module is the sweep's typed config and everything that needs no running cluster: parsing and validating a sweep
file (every reachable combination is built as a `PipelineConfig` before any trial starts), turning the space into
Ray Tune primitives, scoring the objective from the loop's `val_bpb_r{r}` metrics, and writing the results table,
the plot and the best config. `pipelines/tune.py` runs the sweep.

A sweep file (YAML)::

    name: sigma-bptt              # default: the file's stem; `rnc tune --name` overrides
    base:                         # a pipeline config exactly as `rnc pipeline run --config` takes it (or a preset
      preset: tiny                #   name, or the path of such a YAML file)
      storage: {uri: s3://bucket/sweeps}
    stage: pretrain               # or [pretrain, sft]: each trial trains the chain, the objective follows along
    space:                        # field path -> one Tune primitive
      model.recurrence.sigma: {grid: [0.25, 0.5, 1.0]}
      recurrence.bptt_k: {choice: [1, 2]}   # a stage field: applies to every stage the sweep trains
      lr: {loguniform: [1.0e-3, 3.0e-2]}
    num_samples: 1                # samples per grid point
    max_concurrent_trials: 2
    objective: {recurrences: [2, 4, 8], combine: mean}
    scheduler: {type: asha, grace_period: 50, reduction_factor: 2}
    trial_runner: function        # function (run_stage in the trial) | train (a TorchTrainer per trial)

Field paths reach nested fields with dots: `model.<GPTConfig field>` (`model.recurrence.sigma`,
`model.decode.num_recur`); `<StageConfig field>` or `stage.<field>` (every trained stage, e.g. `recurrence.bptt_k`);
`stages.<name>.<field>` or its shorthand `<name>.<field>` (that stage only: `stages.pretrain.recurrence.bptt_k`,
`sft.lr`); `seed`. A bare path whose first name is not a stage field but a model field (`n_embd`) means the model
field. A stage's `recurrence` left unset is the model's, so sweeping `recurrence.<x>` on a stage starts from the
model's values, and `model.recurrence.<x>` reaches every stage that does not set its own.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SkipValidation, ValidationInfo, field_validator, model_validator

from recursive_model.config import GPTConfig
from recursive_model.yaml_config import StrictModel, build, read_yaml_mapping

from .config import STAGE_KINDS, ConfigError, PipelineConfig, PositiveInt, StageConfig

PRIMITIVES = ("grid", "choice", "uniform", "loguniform", "randint")
OBJECTIVE = "objective"  # the metric Tune optimises (mode "min")
TIME_ATTR = "trial_step"  # optimizer steps since the trial started, summed over its chain of stages
DIVERGED_BPB = 1e3  # a non-finite val_bpb (diverged run) scores as this: worst, yet finite for ASHA's percentiles
# Python packages behind Tune's optional search algorithms (ray.tune.search.SEARCH_ALG_IMPORT).
SEARCH_ALG_PACKAGES = {"random": None, "variant_generator": None, "optuna": "optuna", "hyperopt": "hyperopt",
                       "bayesopt": "bayes_opt", "bohb": "hpbandster", "nevergrad": "nevergrad", "zoopt": "zoopt",
                       "hebo": "hebo", "ax": "ax"}
# Fields a sweep must not change: the tokenizer is trained once per sweep; names and storage belong to the sweep.
UNSWEEPABLE_MODEL = {"vocab_size", "extra"}
UNSWEEPABLE_STAGE = {"name": "it names the stage",
                     "steps": "the trial budget is fixed per sweep; ASHA decides how many steps a trial gets"}
TOP_LEVEL = {"seed"}
_MAX_COMBINATIONS = 5_000  # validation builds one PipelineConfig per reachable combination (~1 ms each)



def _field_types(tp: Any) -> dict[str, Any] | None:
    """Field name -> type of a config class (a pydantic model or a dataclass, possibly Optional or Annotated);
    None for a single value."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {name: f.annotation for name, f in tp.model_fields.items()}
    if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return None
    hints = typing.get_type_hints(tp)
    return {f.name: hints[f.name] for f in dataclasses.fields(tp)}


_GPT_FIELDS = _field_types(GPTConfig)
_STAGE_FIELDS = _field_types(StageConfig)


def _leaf_type(root: dict[str, Any], label: str, dotted: str, where: str) -> Any:
    """The type of the single-valued field `dotted` below `root`'s fields; ConfigError naming the path otherwise."""
    fields, parts = root, dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join([label, *parts[:i]])
        if fields is None:
            raise ConfigError(f"{where}: {here} is a single value; it has no field {part!r}")
        if part not in fields:
            raise ConfigError(f"{where}: unknown field {part!r} in {here}{_suggest(part, fields)}; "
                              f"fields of {here}: {sorted(fields)}")
        tp, fields = fields[part], _field_types(fields[part])
    if fields is not None:
        raise ConfigError(f"{where}: {label}.{dotted} is a group of fields; sweep one of them: "
                          f"{[f'{label}.{dotted}.{f}' for f in fields]}")
    return tp


# ------------------------------------------------------------------------------------------------------ the space
@dataclass(frozen=True)
class Target:
    """Where a field path lands in a pipeline config."""

    kind: str  # model | stage | top
    field: str  # dotted path below the model / the stage, e.g. "recurrence.bptt_k"
    stages: tuple[str, ...] = ()  # kind == stage: the stages it applies to
    type: Any = dataclasses.field(default=int, compare=False, repr=False)  # the field's type

    def is_int(self) -> bool:
        args = typing.get_args(self.type)
        return self.type is int or int in args and float not in args


@dataclass
class Dimension:
    """One swept field: a Tune primitive over the values of a field path."""

    path: str  # as written in the sweep file, e.g. "model.recurrence.sigma"
    kind: str  # grid | choice | uniform | loguniform | randint
    values: list[Any]  # grid/choice: the values; uniform/loguniform: [low, high]; randint: [low, high) as Tune's
    target: Target

    def tune_domain(self) -> Any:
        """The Tune primitive (tune.grid_search, tune.choice, ...)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](low, high)

    def reachable(self) -> list[Any]:
        """Values to validate: all of a discrete set, the two ends of a range (the constraints checked are monotone
        in each field, so a range is valid when both ends are)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform" or (
            self.kind in ("grid", "choice") and len(self.values) > 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in self.values)
            and max(self.values) / min(self.values) >= 20)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


def resolve_path(path: str, chain: list[str]) -> Target:
    """Map a field path of the sweep file onto the pipeline config; ConfigError naming the path otherwise."""
    where = f"space[{path!r}]"
    head, _, rest = path.partition(".")
    if head == "stages" and rest:  # stages.<name>.<field> is spelled <name>.<field> below
        path = rest
        head, _, rest = rest.partition(".")
        if head not in STAGE_KINDS or not rest:
            raise ConfigError(f"{where}: expected stages.<name>.<field> with name in {list(STAGE_KINDS)}")
    if rest and head == "model":
        if rest.split(".")[0] in UNSWEEPABLE_MODEL:
            raise ConfigError(f"{where}: model.{rest} cannot be swept (the tokenizer is trained once per sweep)")
        return Target("model", rest, type=_leaf_type(_GPT_FIELDS, "model", rest, where))
    if rest and (head == "stage" or head in STAGE_KINDS):
        stages = tuple(chain) if head == "stage" else (head,)
        if head != "stage" and head not in chain:
            raise ConfigError(f"{where}: stage {head!r} is not trained by this sweep (stage: {chain})")
        return _stage_target(rest, stages, where)
    if path in TOP_LEVEL:
        return Target("top", path)
    if head in _STAGE_FIELDS or head in UNSWEEPABLE_STAGE:
        return _stage_target(path, tuple(chain), where)
    if head in _GPT_FIELDS and head not in UNSWEEPABLE_MODEL:
        return Target("model", path, type=_leaf_type(_GPT_FIELDS, "model", path, where))
    known = [*_STAGE_FIELDS, *(f"model.{f}" for f in _GPT_FIELDS), *TOP_LEVEL]
    raise ConfigError(f"{where}: unknown field path{_suggest(path, known)}; use model.<field> (GPTConfig), "
                      f"<stage field> / stage.<field> / stages.<name>.<field> / {'|'.join(STAGE_KINDS)}.<field> "
                      f"(StageConfig), or seed")


def _stage_target(dotted: str, stages: tuple[str, ...], where: str) -> Target:
    name = dotted.split(".")[0]
    if name in UNSWEEPABLE_STAGE:
        raise ConfigError(f"{where}: {name} cannot be swept ({UNSWEEPABLE_STAGE[name]})")
    return Target("stage", dotted, stages, type=_leaf_type(_STAGE_FIELDS, "stage", dotted, where))


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; a sweep file means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_dimension(path: str, spec: Any, chain: list[str]) -> Dimension:
    """One `space:` entry: {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or
    {randint: [lo, hi]} (hi exclusive, as Tune's)."""
    where = f"space[{path!r}]"
    target = resolve_path(path, chain)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be one primitive like {{grid: [1, 2]}} or {{uniform: [0.1, 1.0]}}; "
                          f"allowed primitives: {list(PRIMITIVES)}; got {spec!r}")
    (kind, values), = spec.items()
    if kind not in PRIMITIVES:
        raise ConfigError(f"{where}: unknown primitive {kind!r}; allowed: {list(PRIMITIVES)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind} must be a non-empty list, got {values!r}")
    values = [_number(v) for v in values]
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{kind} must be [low, high] numbers, got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}.{kind}: low={low!r} must be < high={high!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.loguniform: low={low!r} must be > 0")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}.randint: bounds must be integers (high is exclusive), got {values!r}")
        if kind in ("uniform", "loguniform") and target.is_int():
            raise ConfigError(f"{where}: {target.field} is an integer field; {kind} samples floats "
                              f"(use randint, choice or grid)")
    return Dimension(path, kind, values, target)


# --------------------------------------------------------------------------------------------- objective, ASHA
class ObjectiveSpec(StrictModel):
    """What a trial is scored on: validation bits-per-byte at several test-time r, combined; lower is better."""

    recurrences: list[PositiveInt] = Field(
        default_factory=lambda: [2, 4, 8], min_length=1, description="test-time r values (val_bpb_r{r})"
    )
    combine: Literal["mean", "max", "last", "weighted"] = Field(
        "mean", description="mean | max (worst r) | last (largest r: rewards gains from more r) | weighted"
    )
    weights: list[float] | None = Field(None, description="combine: weighted, one per recurrence")

    @field_validator("weights", mode="before")
    @classmethod
    def _yaml_numbers(cls, w: Any) -> Any:
        return [_number(x) for x in w] if isinstance(w, list) else w

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        rs, w = self.recurrences, self.weights
        if len(set(rs)) != len(rs):
            raise ValueError(f"objective.recurrences={rs!r} has duplicates")
        if self.combine == "weighted":
            if w is None or len(w) != len(rs) or any(x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"objective.weights={w!r} is invalid; allowed: {len(rs)} weights >= 0 "
                                 f"(one per recurrence) with a positive sum")
        elif w is not None:
            raise ValueError("objective.weights is only used with combine: weighted")
        return self

    def score(self, metrics: dict[str, Any]) -> dict[str, float] | None:
        """`objective`, `bpb_gain` (bpb at the smallest r minus at the largest: > 0 means more recurrences help)
        from a loop report; None when the report has no validation at every objective r (not an eval step)."""
        values = [metrics.get(f"val_bpb_r{r}") for r in self.recurrences]
        if any(v is None for v in values):
            return None
        bpb = [float(v) if math.isfinite(float(v)) else DIVERGED_BPB for v in values]
        if self.combine == "mean":
            obj = sum(bpb) / len(bpb)
        elif self.combine == "max":
            obj = max(bpb)
        elif self.combine == "last":
            obj = bpb[self.recurrences.index(max(self.recurrences))]
        else:
            w = self.weights or []
            obj = sum(x * b for x, b in zip(w, bpb, strict=True)) / sum(w)
        lo, hi = self.recurrences.index(min(self.recurrences)), self.recurrences.index(max(self.recurrences))
        return {OBJECTIVE: obj, "bpb_gain": bpb[lo] - bpb[hi]}


class SchedulerSpec(StrictModel):
    """Early stopping on the objective, in trial steps (optimizer steps summed over the trial's stages)."""

    type: Literal["asha", "fifo"] = Field("asha", description="asha | fifo (no early stopping)")
    grace_period: PositiveInt | None = Field(None, description="steps before a trial can be stopped; None: first eval")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung")
    max_t: PositiveInt | None = Field(None, description="None: the trial's total steps")

    @field_validator("reduction_factor", mode="before")
    @classmethod
    def _yaml_number(cls, v: Any) -> Any:
        return _number(v)

    def validate_steps(self, total_steps: int, first_eval: int, path: str = "scheduler") -> None:
        """The step bounds against the trial's steps (known only with the base config)."""
        if self.type == "fifo":
            return
        grace, max_t = self.resolved(total_steps, first_eval)
        if not 1 <= max_t <= total_steps:
            raise ConfigError(f"{path}.max_t={max_t!r} is invalid; allowed: 1..{total_steps} (the trial's steps)")
        if not 1 <= grace <= max_t:
            raise ConfigError(f"{path}.grace_period={grace!r} is invalid; allowed: 1..max_t={max_t}")

    def resolved(self, total_steps: int, first_eval: int) -> tuple[int, int]:
        """(grace_period, max_t) with the defaults filled in."""
        max_t = self.max_t if self.max_t is not None else total_steps
        return (self.grace_period if self.grace_period is not None else min(first_eval, max_t)), max_t


# ---------------------------------------------------------------------------------------------------- the sweep
class SweepSpec(StrictModel):
    """A whole sweep, validated when built, so a SweepSpec that exists is runnable.

    Build it with `from_yaml` / `from_dict`: the file's `stage:` (a name or a list) becomes `stages`, `base:` (a
    mapping, a preset name or a YAML path) a PipelineConfig, and each `space:` entry a Dimension.
    """

    name: str
    base: PipelineConfig = Field(description="the effective pipeline config every trial starts from")
    space: Annotated[dict[str, Dimension], SkipValidation] = Field(description="field path -> Tune primitive")
    stages: list[str] = Field(default_factory=lambda: ["pretrain"], description="trained by each trial, in order")
    num_samples: PositiveInt = Field(1, description="samples per grid point (random primitives drawn anew for each)")
    max_concurrent_trials: PositiveInt | None = Field(None, description="None: as many as the resources allow")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search_alg: dict[str, Any] | None = Field(None, description="None: Tune's default (grid + random); {type: optuna}")
    trial_runner: Literal["function", "train"] = Field(
        "function", description="function: run_stage inside the trial | train: a TorchTrainer per trial"
    )
    trial_resources: dict[str, float] | None = Field(None, description="function runner: {CPU: n, GPU: m} per trial")
    seed: int = Field(0, description="random state of the default search algorithm (which random values are drawn)")

    @model_validator(mode="before")
    @classmethod
    def _from_file_form(cls, data: Any, info: ValidationInfo) -> Any:
        """The sweep file's spelling -> the fields: stage -> stages, base -> PipelineConfig, space -> Dimensions.
        `info.context` may carry `base_dir` (for a relative `base:` path) and `storage` (a new storage location)."""
        if not isinstance(data, dict) or isinstance(data.get("base"), PipelineConfig):
            return data
        ctx = info.context or {}
        d = dict(data)
        if "stage" in d:
            stage = d.pop("stage")
            d["stages"] = [stage] if isinstance(stage, str) else stage
        if "base" not in d:
            raise ConfigError("base is missing: give a pipeline config (e.g. base: {preset: tiny}), a preset name "
                              "or the path of a pipeline YAML")
        d["base"] = _load_base(d["base"], ctx.get("base_dir"), ctx.get("storage"))
        d.setdefault("name", d["base"].run_name)
        chain = d.get("stages", ["pretrain"])
        if not isinstance(chain, list) or not chain or not all(isinstance(s, str) for s in chain):
            raise ConfigError(f"stage={chain!r} is invalid; allowed: a stage name or a list like [pretrain, sft]")
        space = d.get("space") or {}
        if not isinstance(space, dict):
            raise ConfigError(f"space must be a mapping of field path -> primitive, got {space!r}")
        d["space"] = {str(p): parse_dimension(str(p), spec, chain) for p, spec in space.items()}
        if isinstance(d.get("search_alg"), str):
            d["search_alg"] = {"type": d["search_alg"]}
        if isinstance(d.get("trial_resources"), dict):
            d["trial_resources"] = {str(k).upper(): _number(v) for k, v in d["trial_resources"].items()}
        return d

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        self.validate_sweep()
        return self

    # ------------------------------------------------------------------------------------------ validation
    def validate_sweep(self) -> None:
        """The checks that need the whole sweep: stages against the base, steps, resources, every combination."""
        if not self.name or "/" in self.name or self.name != self.name.strip():
            raise ConfigError(f"name={self.name!r} is invalid; allowed: a non-empty name without '/'")
        configured = [s.name for s in self.base.stages]
        for s in self.stages:
            if s not in configured:
                raise ConfigError(f"stage: {s!r} is not configured in base (configured: {configured})")
        if self.stages[0] != "pretrain":
            raise ConfigError(f"stage={self.stages!r}: the chain must start with pretrain (trials train from scratch)")
        order = [STAGE_KINDS.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ConfigError(f"stage={self.stages!r}: stages must be distinct and in pipeline order {STAGE_KINDS}")
        if not self.space:
            raise ConfigError("space is empty: give at least one field to sweep, e.g. "
                              "space: {model.recurrence.sigma: {grid: [0.25, 0.5]}}")
        self._validate_resources()
        first_eval = self.base.stage(self.stages[0]).eval_every
        self.scheduler.validate_steps(self.total_steps, min(first_eval, self.base.stage(self.stages[0]).steps))
        self._validate_search_alg()
        self._validate_shadowing()
        self._validate_combinations()

    def _validate_resources(self) -> None:
        res = self.trial_resources
        if res is None:
            return
        if self.trial_runner != "function":
            raise ConfigError("trial_resources: only for trial_runner: function; the train runner takes its "
                              "workers from base.scaling")
        if not res or set(res) - {"CPU", "GPU"}:
            raise ConfigError(f"trial_resources={res!r} is invalid; allowed: {{CPU: n, GPU: m}}")
        for k, v in res.items():
            if v < 0:
                raise ConfigError(f"trial_resources.{k}={v!r} is invalid; allowed: a number >= 0")
        if res.get("CPU", 0) <= 0:
            raise ConfigError(f"trial_resources.CPU={res.get('CPU')!r} must be > 0 (Ray refuses 0; use e.g. 0.5)")

    def _validate_search_alg(self) -> None:
        import importlib.util

        alg = self.search_alg
        if alg is None:
            return
        if not isinstance(alg, dict) or not isinstance(alg.get("type"), str):
            raise ConfigError(f"search_alg={alg!r} is invalid; allowed: null (Tune's default) or {{type: NAME, ...}}"
                              f" with NAME in {sorted(SEARCH_ALG_PACKAGES)}")
        name = alg["type"].lower()
        if name not in SEARCH_ALG_PACKAGES:
            raise ConfigError(f"search_alg.type={alg['type']!r} is unknown; allowed: {sorted(SEARCH_ALG_PACKAGES)}")
        package = SEARCH_ALG_PACKAGES[name]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"search_alg.type={name!r} needs the Python package {package!r}, which is not "
                              f"installed (pip install {package}), or drop search_alg for Tune's default")
        if package and any(d.kind == "grid" for d in self.space.values()):
            grids = [p for p, d in self.space.items() if d.kind == "grid"]
            raise ConfigError(f"search_alg.type={name!r} cannot sample grid dimensions {grids}; use choice")

    def _validate_shadowing(self) -> None:
        """model.recurrence.* swept while a trained stage sets its own recurrence: the stage's replaces the model's,
        so the sweep would change nothing."""
        for path, dim in self.space.items():
            if dim.target.kind != "model" or dim.target.field.split(".")[0] != "recurrence":
                continue
            for name in self.stages:
                own = self.base.stage(name).recurrence
                if own is not None:
                    stage_path = f"stages.{name}.{dim.target.field}"
                    raise ConfigError(f"space[{path!r}] has no effect: base stage {name!r} sets its own recurrence "
                                      f"({own}), which replaces model.recurrence; sweep {stage_path!r} instead")

    def _validate_combinations(self) -> None:
        """Build the pipeline config of every reachable combination; check the recurrence constraints per stage."""
        dims = list(self.space.values())
        n = math.prod(len(d.reachable()) for d in dims)
        if n > _MAX_COMBINATIONS:
            raise ConfigError(f"space has {n} reachable combinations to validate (> {_MAX_COMBINATIONS}); "
                              f"use fewer grid/choice values")
        for combo in itertools.product(*(d.reachable() for d in dims)):
            params = {d.path: v for d, v in zip(dims, combo, strict=True)}
            try:
                cfg = self.candidate_config(params)
            except ConfigError as exc:
                raise ConfigError(f"space: combination {params} gives an invalid pipeline config: {exc}") from None
            model = cfg.gpt_config()
            for name in self.stages:
                rec = cfg.stage(name).recurrence_for(model)
                if model.is_recursive and rec.bptt_k > rec.r_max:
                    raise ConfigError(f"space: combination {params} gives recurrence.bptt_k={rec.bptt_k} > r_max="
                                      f"{rec.r_max} in stage {name!r}; gradients can flow through at most r_max "
                                      f"recurrences, so narrow bptt_k or raise r_max")

    # ------------------------------------------------------------------------------------------ configs
    @property
    def total_steps(self) -> int:
        """Optimizer steps of one trial that runs to the end (the chain's stages summed)."""
        return sum(self.base.stage(s).steps for s in self.stages)

    def candidate_config(self, params: dict[str, Any], run_name: str | None = None) -> PipelineConfig:
        """The base config with `params` (field path -> value) applied; the objective's r values are added to the
        trained stages' eval_recur so every eval report carries the objective. Raises ConfigError."""
        d = copy.deepcopy(self.base.to_dict())
        d["run_name"] = run_name or f"{self.name}-best"
        stages = {s["name"]: s for s in d["stages"]}
        for path, value in params.items():
            target = self.space[path].target if path in self.space else resolve_path(path, self.stages)
            if target.kind == "model":
                _assign(d["model"], target.field, value)
            elif target.kind == "top":
                d[target.field] = value
            else:
                for name in target.stages:
                    _assign(stages[name], target.field, value)
        for name in self.stages:
            stages[name]["eval_recur"] = sorted(set(stages[name]["eval_recur"]) | set(self.objective.recurrences))
        return PipelineConfig.from_dict(d)

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: flat, keyed by field path."""
        return {path: dim.tune_domain() for path, dim in self.space.items()}

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A self-contained dict in the sweep file's form (base as the full effective config): what `--resume`
        reads back."""
        return {
            "name": self.name, "base": self.base.to_dict(), "stage": list(self.stages),
            "space": {p: d.to_dict() for p, d in self.space.items()}, "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials, "objective": self.objective.to_dict(),
            "scheduler": self.scheduler.to_dict(), "search_alg": self.search_alg,
            "trial_runner": self.trial_runner, "trial_resources": self.trial_resources, "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, name: str | None = None, base_dir: str | os.PathLike | None = None,
                  storage: dict[str, Any] | None = None) -> SweepSpec:
        """Parse a sweep dict (the YAML). `name` and `storage` (StorageConfig fields) override the file's values;
        `base_dir` resolves a `base:` given as a relative YAML path."""
        if not isinstance(d, dict):
            raise ConfigError(f"a sweep file must be a mapping, got {type(d).__name__}")
        if name is not None:
            d = {**d, "name": name}
        return build(cls, d, context={"base_dir": base_dir, "storage": storage})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, name: str | None = None,
                  storage: dict[str, Any] | None = None) -> SweepSpec:
        data = read_yaml_mapping(path, "sweep file")
        if "name" not in data and name is None:
            name = Path(path).stem
        return cls.from_dict(data, name=name, base_dir=Path(path).parent, storage=storage)


def _assign(d: dict[str, Any], dotted: str, value: Any) -> None:
    """d[a][b][c] = value for "a.b.c"; an unset sub-config (None: the model's, or off) becomes a partial mapping,
    which PipelineConfig / GPTConfig complete with the values it would otherwise have had."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not isinstance(d.get(name), dict):
            d[name] = {}
        d = d[name]
    d[leaf] = value


def _load_base(base: Any, base_dir: str | os.PathLike | None, storage: dict[str, Any] | None) -> PipelineConfig:
    """`base:` as a mapping (preset + overrides, or a full config), a preset name, or a pipeline YAML path."""
    if isinstance(base, str):
        if base.endswith((".yaml", ".yml")):
            path = Path(base) if Path(base).is_absolute() or base_dir is None else Path(base_dir) / base
            d = yaml.safe_load(PipelineConfig.from_yaml(path).to_yaml())
        else:
            d = {"preset": base}
    elif isinstance(base, dict):
        d = copy.deepcopy(base)
    else:
        raise ConfigError(f"base must be a pipeline config mapping, a preset name or a YAML path, got {base!r}")
    if storage:
        d["storage"] = dict(storage)  # a new location: none of the old storage's settings carry over
    try:
        preset = d.pop("preset", None)
        return PipelineConfig.from_preset(preset, **d) if preset else PipelineConfig.from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
