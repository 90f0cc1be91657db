"""Serving configuration: the compute tiers and the HTTP edge, validated with pydantic (YAML and `serve deploy` args).

A tier is one Serve deployment of the same weights at its own range of recurrences per token (`r_min`..`r_max`), KV
cache strategy, resources and autoscaling. Tiers, their r ranges and scaling are configuration, not code: the YAML
file given to `rnc serve deploy --config` (or the `args:` of a Serve config file) is exactly `ServeConfig`.

    checkpoint: s3://bucket/run/sft/final        # or a local directory
    default_tier: low
    tiers:
      - {name: low, r_min: 1, r_max: 2, kv_cache: final, num_cpus: 0.5,
         autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}
      - {name: high, r_min: 3, r_max: 8, kv_cache: exact, num_cpus: 1}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recursive_model.config import parse_kv_cache

DEFAULT_AUTH_TOKEN_ENV = "RNC_SERVE_TOKEN"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly instead of silently falling back to a default.
    model_config = ConfigDict(extra="forbid")


class AutoscalingSpec(_Strict):
    """The subset of Serve's `autoscaling_config` a tier sets; passed through unchanged."""

    min_replicas: int = Field(1, ge=0, description="replicas kept ready even when idle (0 = scale to zero)")
    max_replicas: int = Field(1, ge=1, description="upper bound on this tier's replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time (default min_replicas)")
    target_ongoing_requests: float = Field(4.0, gt=0, description="ongoing+queued requests per replica to aim for")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must persist this long before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="idleness must persist this long before removing one")
    look_back_period_s: float = Field(30.0, gt=0, description="window the autoscaler averages request counts over")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} must be >= min_replicas={self.min_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas={self.initial_replicas} must be in [min_replicas, max_replicas] = "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class TierConfig(_Strict):
    """One compute tier: a Serve deployment serving requests whose recurrence budget lies in [r_min, r_max]."""

    name: str = Field(description="tier name used in requests and metrics, e.g. 'low'")
    r_min: int = Field(1, ge=1, description="smallest recurrences-per-token budget this tier accepts")
    r_max: int = Field(ge=1, description="largest budget this tier accepts; also its cost for routing")
    default_recur: int | None = Field(None, ge=1, description="r used when a request names only the tier (r_max)")
    kv_cache: str = Field("exact", description="KV cache strategy: exact | final | ring:K")
    exit_criterion: Literal["kl", "latent"] = Field("latent", description="adaptive exit test, when a threshold is set")
    exit_threshold: float | None = Field(None, gt=0, description="default adaptive-exit threshold (None = full r)")
    exit_min_recur: int = Field(1, ge=1, description="adaptive exit never stops before this many recurrences")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica; >1 oversubscribes small CPUs")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica accepts at once (queue + batch)")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together in one Engine.generate call")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="longest wait for a batch to fill up to the recent demand before it starts"
    )
    batch_wait_fraction: float = Field(
        0.25, ge=0, le=1, description="...or up to this fraction of the previous batch's decode time, if longer"
    )
    stream_interval_s: float = Field(
        0.05, ge=0, description="streaming: tokens are sent at most this often after the first (merged in between)"
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    description: str = Field("", description="free text shown in /v1/models and the chat page")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"tier name {v!r} must match {_NAME_RE.pattern} (it becomes a deployment and URL name)")
        return v

    @field_validator("kv_cache")
    @classmethod
    def _check_kv(cls, v: str) -> str:
        parse_kv_cache(v)  # raises ValueError naming the allowed strategies
        return v

    @model_validator(mode="after")
    def _check_ranges(self) -> TierConfig:
        if self.r_max < self.r_min:
            raise ValueError(f"tier {self.name!r}: r_max={self.r_max} must be >= r_min={self.r_min}")
        if self.default_recur is not None and not self.r_min <= self.default_recur <= self.r_max:
            raise ValueError(
                f"tier {self.name!r}: default_recur={self.default_recur} must be in [r_min, r_max] = "
                f"[{self.r_min}, {self.r_max}]"
            )
        if self.exit_min_recur > self.r_max:
            raise ValueError(f"tier {self.name!r}: exit_min_recur={self.exit_min_recur} exceeds r_max={self.r_max}")
        if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            # A replica never holds more than max_ongoing_requests, so the target would never be reached.
            raise ValueError(
                f"tier {self.name!r}: autoscaling.target_ongoing_requests={self.autoscaling.target_ongoing_requests}"
                f" must be <= max_ongoing_requests={self.max_ongoing_requests}"
            )
        return self

    @property
    def recur(self) -> int:
        """r used when a request names this tier without its own max_recur."""
        return self.default_recur if self.default_recur is not None else self.r_max

    def serve_options(self, env: dict[str, str]) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)` of this tier."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        return {
            "name": f"tier-{self.name}",
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": self.autoscaling.model_dump(exclude_none=True),
            "ray_actor_options": actor,
        }


class IngressConfig(_Strict):
    """The FastAPI ingress: parsing, auth, routing and streaming only, so it needs little CPU."""

    num_replicas: int = Field(1, ge=1, description="ingress replicas (each is a cheap asyncio process)")
    num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per ingress replica")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="concurrent HTTP requests per ingress replica (it only awaits the tiers)"
    )


class ServeConfig(_Strict):
    """Everything `build_app` needs; also the `args:` of a Serve config file (see `serve.cli.build_serve_config`)."""

    checkpoint: str = Field(description="checkpoint URI: s3://bucket/path[?endpoint_override=...] or local directory")
    app_name: str = Field("rnc", description="Serve application name")
    route_prefix: str = Field("/", description="HTTP path the application is mounted at")
    model_name: str = Field("recursive-gpt", description="the model id of /v1/models and responses")
    tiers: list[TierConfig] = Field(min_length=1, description="compute tiers; routing cost is r_max")
    default_tier: str | None = Field(None, description="tier for requests without a budget (default: cheapest)")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    auth_token_env: str | None = Field(
        DEFAULT_AUTH_TOKEN_ENV, description="env var (in the ingress replica) holding the bearer token; unset = open"
    )
    auth_token: str | None = Field(
        None, description="bearer token given inline (prefer auth_token_env: this ends up in the Serve config)"
    )
    cache_dir: str | None = Field(
        None, description="node-local directory caching downloaded checkpoints (default: $TMPDIR/rnc-serve-cache)"
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="environment variables set in every replica (e.g. S3 endpoint settings)"
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("checkpoint")
    @classmethod
    def _check_checkpoint(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("checkpoint must be a non-empty URI or path")
        return v.strip()

    @field_validator("route_prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix={v!r} must start with '/'")
        return v

    @model_validator(mode="after")
    def _check_tiers(self) -> ServeConfig:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {dupes}")
        if self.default_tier is not None and self.default_tier not in names:
            raise ValueError(f"default_tier={self.default_tier!r} is not a tier; tiers: {names}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens={self.default_max_tokens} must be <= max_tokens_limit={self.max_tokens_limit}"
            )
        return self

    def resolve_auth_token(self) -> str | None:
        """The bearer token requests must carry, or None when auth is off. Read where the ingress runs."""
        if self.auth_token:
            return self.auth_token
        if self.auth_token_env:
            return os.environ.get(self.auth_token_env) or None
        return None

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)


def default_tiers() -> list[TierConfig]:
    """Three tiers for a model trained around r = 4: shallow and cheap, the training depth, and extrapolated depth.
    Half a CPU each, so all of them (and the ingress) fit a 2-core machine; size real deployments in a serve.yaml."""
    return [
        TierConfig(name="low", r_min=1, r_max=2, kv_cache="final", num_cpus=0.5, description="fast, shallow"),
        TierConfig(name="medium", r_min=3, r_max=4, kv_cache="exact", num_cpus=0.5, description="training depth"),
        TierConfig(
            name="high",
            r_min=5,
            r_max=16,
            default_recur=8,
            kv_cache="exact",
            num_cpus=0.5,
            description="deeper than training: test-time compute",
        ),
    ]


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error, each naming the field path, e.g. `tiers[1].r_max: Input should be ...`."""
    lines = []
    for err in exc.errors():
        path = prefix + _loc_to_path(err.get("loc", ()))
        lines.append(f"{path or '<root>'}: {err.get('msg', '')}")
    return "; ".join(lines)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServeConfig:
    """ServeConfig from a YAML file (or the default tiers when `path` is None), with top-level overrides applied
    (e.g. `checkpoint=` from the command line). Raises ValueError naming the bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of ServeConfig fields")
        data = dict(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "tiers" not in data:
        data["tiers"] = [t.model_dump() for t in default_tiers()]
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}invalid serve config: {format_validation_error(exc)}") from None
