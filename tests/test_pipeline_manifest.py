"""The pipeline manifest (`<storage>/<run>/pipeline.json`): canonical config hashes and stage bookkeeping, on a
local folder and on a real S3 protocol server (moto) on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoints import Storage
from pipelines.manifest import PipelineManifest, config_hash


@dataclass
class StageConfig:
    preset: str = "tiny"
    steps: int = 10


def test_config_hash_is_canonical() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash(StageConfig()) == config_hash({"steps": 10, "preset": "tiny"})
    assert config_hash(StageConfig(steps=11)) != config_hash(StageConfig())
    with pytest.raises(TypeError):
        config_hash({"path": Path("/x")})  # no silent str(): an unstable repr would force reruns


def test_pipeline_manifest_semantics(storage: Storage) -> None:
    stages = ["pretrain", "mid", "sft"]
    m = PipelineManifest.load(storage, "demo", stages=stages)
    assert [r["status"] for r in m.to_table()] == ["pending"] * 3
    assert not storage.exists(m.path)  # nothing written until something happens

    h = config_hash(StageConfig())
    m.mark_running("pretrain", h)
    assert PipelineManifest.load(storage, "demo").stages["pretrain"].status == "running"  # saved at once
    ckpt = storage.uri_for(storage.join("demo", "pretrain", "checkpoint_000010"))
    m.mark_finished("pretrain", ckpt, {"val_bpb": 1.23456789, "step": 10})
    m.mark_running("mid", h)
    m.mark_failed("mid", RuntimeError("worker died\nat step 3"))

    again = PipelineManifest.load(storage, "demo", stages=stages)  # a new driver process
    assert again.is_finished("pretrain", h)  # skip it
    assert again.checkpoint_uri("pretrain") == ckpt
    assert not again.is_finished("pretrain", config_hash(StageConfig(steps=20)))  # config changed: rerun
    assert not again.is_finished("mid", h) and not again.is_finished("sft", h)
    rows = {r["stage"]: r for r in again.to_table()}
    assert list(rows) == stages
    assert rows["pretrain"]["status"] == "finished" and rows["pretrain"]["checkpoint"] == ckpt
    assert rows["pretrain"]["metrics"] == "val_bpb=1.235 step=10" and rows["pretrain"]["config"] == h[:12]
    assert rows["mid"]["status"] == "failed" and rows["mid"]["error"] == "RuntimeError: worker died at step 3"

    new_h = config_hash(StageConfig(steps=20))
    again.mark_running("pretrain", new_h)  # rerun clears the old result
    assert again.checkpoint_uri("pretrain") is None and again.stages["pretrain"].metrics == {}
    with pytest.raises(ValueError, match="mark_running first"):
        again.mark_finished("sft", None)
    data = storage.read_json(again.path)
    assert data["format"] == 1 and data["run"] == "demo" and list(data["stages"]) == stages
