"""The pipeline manifest: `<run root>/pipeline.json`, what each stage of a run did and whether it must rerun.

A stage counts as finished only for the config it was run with: the DAG driver hashes each stage's config
(`config_hash`) and skips a stage when `is_finished(stage, hash)`; any change to the config makes it rerun.

One driver owns a run's manifest and rewrites the whole file on every change (single PUT on S3, temp + rename
locally), so readers such as `rnc pipeline status` always see a complete file.

    {"format": 1, "run": "demo", "updated_at": "...",
     "stages": {"pretrain": {"status": "finished", "config_hash": "ab12...", "checkpoint_uri": "s3://...",
                             "metrics": {"val_bpb": 1.9}, "started_at": "...", "ended_at": "...", "error": null}}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from checkpoints import Storage

MANIFEST_FILE = "pipeline.json"
FORMAT = 1
Status = Literal["pending", "running", "finished", "failed"]
STATUSES: tuple[str, ...] = ("pending", "running", "finished", "failed")


def config_hash(config: Mapping[str, Any] | Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a stage config: a dict or a dataclass.

    Values must be JSON types; anything else raises TypeError rather than being str()-ed, because a repr that
    changes between runs (object addresses) would silently force a rerun every time.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    """What happened to one stage in its latest attempt."""

    status: Status = "pending"
    config_hash: str | None = None  # hash of the config of the latest attempt
    checkpoint_uri: str | None = None  # final checkpoint of a finished stage (None for stages without one, e.g. eval)
    metrics: dict[str, Any] = field(default_factory=dict)
    started_at: str | None = None  # ISO-8601 UTC
    ended_at: str | None = None
    error: str | None = None  # one-line reason of a failed attempt

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"StageRecord.status must be one of {STATUSES}, got {self.status!r}")


class PipelineManifest:
    """Per-stage status of one pipeline run, persisted at `storage.join(run_name, "pipeline.json")`.

    The `mark_*` methods update the record and save immediately, so a crashed driver leaves an accurate file.
    """

    def __init__(self, storage: Storage, run_name: str, stages: Mapping[str, StageRecord] | None = None):
        if not run_name or "/" in run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {run_name!r}")
        self.storage = storage
        self.run_name = run_name
        self.stages: dict[str, StageRecord] = dict(stages or {})

    @property
    def path(self) -> str:
        """Filesystem path of pipeline.json in `storage`."""
        return self.storage.join(self.run_name, MANIFEST_FILE)

    @classmethod
    def load(cls, storage: Storage, run_name: str, stages: Sequence[str] = ()) -> PipelineManifest:
        """Read the run's manifest, or start an empty one if the run is new. Stage names in `stages` that the
        file does not know yet are added as pending, in order, so the status table lists the whole pipeline."""
        manifest = cls(storage, run_name)
        try:
            data = storage.read_json(manifest.path)
        except FileNotFoundError:
            data = None
        if data is not None:
            if data.get("format") != FORMAT:
                raise ValueError(
                    f"{storage.uri_for(manifest.path)}: unsupported pipeline manifest format {data.get('format')!r}"
                )
            manifest.stages = {name: StageRecord(**rec) for name, rec in data.get("stages", {}).items()}
        for name in stages:
            manifest.stages.setdefault(name, StageRecord())
        return manifest

    def save(self) -> None:
        """Write the whole manifest (atomically replacing the previous one)."""
        self.storage.write_json(
            self.path,
            {
                "format": FORMAT,
                "run": self.run_name,
                "updated_at": _now(),
                "stages": {name: dataclasses.asdict(rec) for name, rec in self.stages.items()},
            },
        )

    def _record(self, stage: str) -> StageRecord:
        if stage not in self.stages:
            raise KeyError(
                f"stage {stage!r} is not in the pipeline manifest of run {self.run_name!r}; known: {list(self.stages)}"
            )
        return self.stages[stage]

    def mark_running(self, stage: str, config_hash: str) -> None:
        """Start an attempt of `stage` with the config whose hash is `config_hash`; clears previous results."""
        self.stages[stage] = StageRecord(status="running", config_hash=config_hash, started_at=_now())
        self.save()

    def mark_finished(self, stage: str, checkpoint_uri: str | None, metrics: Mapping[str, Any] | None = None) -> None:
        """Record the running attempt of `stage` as done, with its final checkpoint URI and metrics."""
        rec = self._record(stage)
        if rec.status != "running":
            raise ValueError(f"mark_finished({stage!r}): stage is {rec.status!r}, call mark_running first")
        rec.status, rec.checkpoint_uri, rec.metrics = "finished", checkpoint_uri, dict(metrics or {})
        rec.ended_at, rec.error = _now(), None
        self.save()

    def mark_failed(self, stage: str, error: str | BaseException) -> None:
        """Record the running attempt of `stage` as failed, with a one-line reason."""
        rec = self._record(stage)
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        rec.status, rec.ended_at, rec.error = "failed", _now(), " ".join(str(error).split())[:500]
        self.save()

    def is_finished(self, stage: str, config_hash: str) -> bool:
        """True when `stage` finished with exactly this config. A finished stage whose config changed is not
        finished: it must rerun. (Whether its checkpoint is still in storage is the caller's check:
        `storage.is_complete_checkpoint(...)`.)"""
        rec = self.stages.get(stage)
        return rec is not None and rec.status == "finished" and rec.config_hash == config_hash

    def checkpoint_uri(self, stage: str) -> str | None:
        """Final checkpoint URI of a finished stage, else None."""
        rec = self.stages.get(stage)
        return rec.checkpoint_uri if rec is not None and rec.status == "finished" else None

    def to_table(self) -> list[dict[str, str]]:
        """One row of display strings per stage, in pipeline order, for `rnc pipeline status`. Columns: stage,
        status, config (hash prefix), checkpoint, metrics, started, duration, error."""
        rows = []
        for name, rec in self.stages.items():
            duration = ""
            if rec.started_at and rec.ended_at:
                seconds = (
                    datetime.fromisoformat(rec.ended_at) - datetime.fromisoformat(rec.started_at)
                ).total_seconds()
                duration = f"{seconds:.0f}s"
            metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.metrics.items())
            rows.append(
                {
                    "stage": name,
                    "status": rec.status,
                    "config": (rec.config_hash or "")[:12],
                    "checkpoint": rec.checkpoint_uri or "",
                    "metrics": metrics,
                    "started": rec.started_at or "",
                    "duration": duration,
                    "error": rec.error or "",
                }
            )
        return rows
