"""Serving configuration: the compute tiers and the HTTP edge, validated with pydantic (YAML and `serve deploy` args).

A tier is one Serve deployment of the same weights at its own range of recurrences per token (`r_min`..`r_max`), KV
cache strategy, default exit rule, engine sizes (rows per step, waiting queue, KV pool in tokens), resources and
autoscaling. Tiers, their r ranges and scaling are configuration, not code: the YAML file given to
`rnc serve deploy --config` (or the `args:` of a Serve config file) is exactly `ServeConfig`.

    checkpoint: s3://bucket/run/sft/final        # or a local directory
    default_tier: low
    tiers:
      - {name: low, r_min: 1, r_max: 2, kv_cache: final, num_cpus: 0.5, max_running: 32, kv_tokens: 16384,
         autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}
      - {name: high, r_min: 3, r_max: 8, kv_cache: exact, exit: "kl:5e-4", num_cpus: 1}
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recursive_model.recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule, parse_kv_cache
from recursive_model.yaml_config import format_validation_error, read_yaml_mapping

from .affinity import parse_cpus

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


# Tier keys of earlier serve configs and what replaced them (a clear error beats "extra inputs are not permitted").
_REPLACED_KEYS = {
    "exit_criterion": "exit (e.g. exit: 'kl:0.0005')",
    "exit_threshold": "exit (e.g. exit: 'latent:0.001')",
    "exit_min_recur": "exit ('criterion:threshold:min_recur')",
    "max_batch_size": "max_running",
    "batch_wait_timeout_s": "nothing: continuous batching admits requests at every step",
    "batch_wait_fraction": "nothing: continuous batching admits requests at every step",
}


class TierConfig(_Strict):
    """One compute tier: a Serve deployment serving requests whose recurrence budget lies in [r_min, r_max].

    Each replica runs one continuous-batching engine: every request routed to the tier shares its steps, whatever
    its r, exit rule or sampling settings.
    """

    name: str = Field(description="tier name used in requests and metrics, e.g. 'low'")
    r_min: int = Field(1, ge=1, description="smallest recurrences-per-token budget this tier accepts")
    r_max: int = Field(ge=1, description="largest budget this tier accepts; also its cost for routing")
    default_recur: int | None = Field(None, ge=1, description="r used when a request names only the tier (r_max)")
    kv_cache: str = Field("exact", description="KV cache strategy of the replica's pool: exact | final | ring:K")
    exit: ExitRule | None = Field(
        None,
        description="default adaptive exit, 'criterion:threshold[:min_recur]' (criteria: "
        + ", ".join(EXIT_CRITERIA)
        + "); a request's exit_threshold overrides it; none = every token runs r",
    )
    warm_start: bool = Field(False, description="a generated token starts from the previous token's final state")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica; >1 oversubscribes small CPUs")
    engine_cpus: str | None = Field(
        None,
        description="CPUs (cpuset list: '1', '2-7') the replica's engine thread and its torch threads run on, e.g. "
        "cores kept free of Ray's other processes (serve.affinity); null = wherever the OS puts it",
    )
    engine_process: bool = Field(
        True,
        description="run the replica's engine in a child process of its own, where it shares no GIL with the "
        "replica's event loop and Ray's threads (serve.engine_process); false = a thread of the replica",
    )
    compile_decode: bool = Field(
        False,
        description="torch.compile one-token decoding in each replica (GPT.compile_decode: a whole-token graph per "
        "fixed budget, per-block graphs otherwise); the first steps of each new shape pay the compile",
    )
    max_running: int = Field(16, ge=1, description="sequences decoded together in each engine step (at most)")
    max_waiting: int = Field(
        16, ge=1, description="requests a replica queues for admission; one more is refused at once (503)"
    )
    kv_tokens: int | None = Field(
        None, ge=1, description="KV pool size in tokens, shared by all sequences (default max_running x context)"
    )
    kv_block_size: int = Field(16, ge=1, description="tokens per KV pool block (the allocation unit)")
    prefill_chunk: int = Field(128, ge=1, description="prompt tokens per prefill forward")
    prefill_tokens_per_step: int = Field(
        512, ge=1, description="prompt tokens prefilled per engine step at most: running rows never stall long"
    )
    min_step_recur: int | None = Field(
        1,
        ge=1,
        description="an engine step runs at most max(min_step_recur, the smallest budget in flight) recurrences; "
        "deeper tokens carry over to the next step, so low-budget requests do not wait for deep batch mates "
        "(null = a step lasts as long as its deepest row)",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Serve's cap on requests per replica; must exceed max_running + max_waiting so that a full "
        "replica answers 503 instead of Serve queueing silently (default 2 x (max_running + max_waiting))",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After (seconds) of the 503 a full replica answers")
    stream_interval_s: float = Field(
        0.05, ge=0, description="streaming: tokens are sent at most this often after the first (merged in between)"
    )
    stream_chunks_per_s: float | None = Field(
        40.0,
        gt=0,
        description="streaming: a replica's stream chunks per second, shared by its open streams (each chunk costs "
        "CPU on every process it crosses, so under load chunks carry more tokens; null = no budget)",
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    description: str = Field("", description="free text shown in /v1/models and the chat page")

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in data if k in _REPLACED_KEYS]
            if old:
                raise ValueError("; ".join(f"{k} is replaced by {_REPLACED_KEYS[k]}" for k in old))
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"tier name {v!r} must match {_NAME_RE.pattern} (it becomes a deployment and URL name)")
        return v

    @field_validator("engine_cpus")
    @classmethod
    def _check_engine_cpus(cls, v: str | None) -> str | None:
        if v is not None:  # syntax only: which CPUs a node has is checked where the replica starts (resolve_cpus)
            parse_cpus(v)
        return v

    @field_validator("kv_cache")
    @classmethod
    def _check_kv(cls, v: str) -> str:
        parse_kv_cache(v)  # raises ValueError naming the allowed strategies
        return v

    @field_validator("exit", mode="before")
    @classmethod
    def _parse_exit(cls, v: Any) -> Any:
        # YAML gives 'kl:5e-4' or {criterion, threshold, min_recur} (what model_dump writes back); both are ExitRules.
        if isinstance(v, str):
            return None if v.strip().lower() in ("", "none", "off") else ExitRule.parse(v)
        if isinstance(v, dict):
            return ExitRule(**v)
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
        if self.exit is not None and self.exit.min_recur > self.r_max:
            raise ValueError(f"tier {self.name!r}: exit.min_recur={self.exit.min_recur} exceeds r_max={self.r_max}")
        capacity = self.max_running + self.max_waiting
        if self.max_ongoing_requests is not None and self.max_ongoing_requests <= capacity:
            raise ValueError(
                f"tier {self.name!r}: max_ongoing_requests={self.max_ongoing_requests} must be > max_running + "
                f"max_waiting = {capacity}, else Serve queues what the replica should refuse with 503"
            )
        if self.autoscaling.target_ongoing_requests > self.ongoing_limit:
            # A replica never holds more than max_ongoing_requests, so the target would never be reached.
            raise ValueError(
                f"tier {self.name!r}: autoscaling.target_ongoing_requests={self.autoscaling.target_ongoing_requests}"
                f" must be <= max_ongoing_requests={self.ongoing_limit}"
            )
        return self

    @property
    def recur(self) -> int:
        """r used when a request names this tier without its own max_recur."""
        return self.default_recur if self.default_recur is not None else self.r_max

    @property
    def ongoing_limit(self) -> int:
        """Serve's max_ongoing_requests for a replica of this tier."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return 2 * (self.max_running + self.max_waiting)

    def decode(self, num_recur: int, exit: ExitRule | None) -> DecodeSettings:
        """The DecodeSettings of a request this tier runs at r = `num_recur` with `exit`."""
        return DecodeSettings(num_recur=num_recur, kv_cache=self.kv_cache, exit=exit, warm_start=self.warm_start)

    def engine_options(self, sequence_len: int) -> dict[str, Any]:
        """Keyword arguments of the replica's `ContinuousEngine` (the model's context sizes the default pool)."""
        return {
            "kv_cache": self.kv_cache,
            "max_recur": self.r_max,
            "kv_tokens": self.kv_tokens or self.max_running * sequence_len,
            "block_size": self.kv_block_size,
            "max_running": self.max_running,
            "max_waiting": self.max_waiting,
            "prefill_chunk": self.prefill_chunk,
            "prefill_tokens_per_step": self.prefill_tokens_per_step,
            "min_step_recur": self.min_step_recur,
        }

    def serve_options(self, env: dict[str, str]) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)` of this tier."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        return {
            "name": f"tier-{self.name}",
            "max_ongoing_requests": self.ongoing_limit,
            "autoscaling_config": self.autoscaling.model_dump(exclude_none=True),
            "ray_actor_options": actor,
        }


# Set in every replica unless `ServeConfig.env` says otherwise. Ray Serve runs a replica's handlers on an event loop
# in a thread of their own by default; ours only await (the engine has its own thread, scoring an executor), so the
# extra thread is one more hop and one more GIL contender per request. Measured by benchmarks/serve_load.py at
# concurrency 8 (docs/LOG.md, 2026-12-07): replica CPU 70 -> 61 ms per request, HTTP / direct 0.74 -> 0.80.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment of every Ray process (controller, proxies, replicas) for Ray Serve's throughput-optimized
    mode, in which each ingress replica answers HTTP itself, on `port` for the first one on a node and the ports above
    it for more, instead of behind Serve's proxy: one process less on every request's and every stream chunk's path.
    Ray reads it when its processes start, so it belongs to the cluster, not to an application (`rnc serve deploy
    --direct-ingress` starts a local Ray with it). On 2 cores at concurrency 8 it took the ingress's and proxy's CPU
    per request from ~15 to ~4 ms, and streamed tokens/s from 0.63-0.82 to 0.81-0.94 of the bare engine (docs/LOG.md,
    2026-12-07)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port={port}; must be in 1..65535")
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(65535, port + 100)),
    }


class IngressConfig(_Strict):
    """The FastAPI ingress: parsing, auth, routing and streaming only, so it needs little CPU."""

    num_replicas: int = Field(1, ge=1, description="ingress replicas (each is a cheap asyncio process)")
    num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per ingress replica")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="concurrent HTTP requests per ingress replica (it only awaits the tiers)"
    )
    # Serve's handles pass requests and streamed chunks through Ray's object store by default; every replica also runs
    # a gRPC server that a handle can call directly (what Serve's proxy does under RAY_SERVE_PROXY_USE_GRPC=1). At
    # concurrency 8 on 2 cores, grpc took ingress CPU per request from 8-9 to 6-7.5 ms and HTTP / direct from 0.79 to
    # 0.83, streaming 0.68 to 0.73 (docs/LOG.md, 2026-12-07).
    tier_transport: Literal["grpc", "object_store"] = Field(
        "grpc", description="how the ingress reaches the tier replicas: gRPC to the replica, or Ray's object store"
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
        default_factory=dict,
        description="environment variables set in every replica (e.g. S3 endpoint settings); on top of REPLICA_ENV",
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

    def replica_env(self) -> dict[str, str]:
        """What every replica's runtime_env sets: REPLICA_ENV, then `env` (which wins on a shared key)."""
        return {**REPLICA_ENV, **self.env}

    def with_engine_cpus(self, cpus: str | None) -> ServeConfig:
        """This config with every tier's engine_cpus set to `cpus` (validated like the YAML field)."""
        data = self.model_dump(mode="json")
        for t in data["tiers"]:
            t["engine_cpus"] = cpus
        return ServeConfig.model_validate(data)

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


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServeConfig:
    """ServeConfig from a YAML file (or the default tiers when `path` is None), with top-level overrides applied
    (e.g. `checkpoint=` from the command line). Raises ValueError naming the bad field."""
    data = read_yaml_mapping(path, "serve config") if path is not None else {}  # the loader pipelines use too
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "tiers" not in data:
        data["tiers"] = [t.model_dump() for t in default_tiers()]
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}invalid serve config: {format_validation_error(exc)}") from None
