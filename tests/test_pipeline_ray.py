"""Pipelines on a real local Ray cluster with storage on a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpoints import Storage, StorageConfig, StorageUnreachable, fetch_checkpoint, list_checkpoints
from pipelines.config import PipelineConfig
from pipelines.dag import run_pipeline
from pipelines.manifest import PipelineManifest
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.slow
TRAIN_STAGES = ["tokenizer", "pretrain", "mid", "sft"]


def s3_config(bucket, run_name: str, endpoint: str | None = None, **overrides) -> PipelineConfig:
    storage = {"uri": f"s3://{bucket.name}/runs", "endpoint_url": endpoint or bucket.endpoint_url, "retries": 4,
               "backoff_s": 0.05}
    return PipelineConfig.from_preset("tiny", run_name=run_name, storage=storage, **overrides)


def test_dag_end_to_end_into_s3_and_rerun_skips_finished(ray_cluster, s3_bucket, tmp_path):
    cfg = s3_config(s3_bucket, "e2e")
    result = run_pipeline(cfg)
    storage = Storage(cfg.storage)
    manifest = PipelineManifest.load(storage, "e2e")
    assert {n: r.status for n, r in manifest.stages.items()} == {n: "finished" for n in [*TRAIN_STAGES, "eval"]}
    for stage in ("pretrain", "mid", "sft"):
        uri = manifest.checkpoint_uri(stage)
        assert uri.startswith(f"s3://{s3_bucket.name}/runs/e2e/{stage}/step_000006")
        fetch_checkpoint(uri, storage=storage, cache_dir=tmp_path)  # complete and verified
        # keep_last=2: the intermediate and the final checkpoint remain
        assert [s for s, _ in list_checkpoints(storage, storage.join("e2e", stage))] == [6, 3]
    assert manifest.stages["sft"].metrics["step"] == 6 and "val_bpb_r1" in manifest.stages["sft"].metrics
    assert result.report_uri and storage.exists(f"{result.report_uri}/report_card.md")
    again = run_pipeline(cfg)
    assert again.skipped == [*TRAIN_STAGES, "eval"]
    assert PipelineManifest.load(storage, "e2e").stages["sft"].ended_at == manifest.stages["sft"].ended_at


def _train_worker_pids() -> list[int]:
    """PIDs of Ray Train worker processes (Ray sets their process title to ray::RayTrainWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmd:
                pids.append(int(entry.name))
    return pids


def test_worker_killed_mid_stage_recovers_from_last_checkpoint(ray_cluster, s3_bucket):
    slow_model = {"preset": "tiny", "vocab_size": 300, "n_embd": 128, "sequence_len": 256}
    stage = dict(name="pretrain", steps=30, batch_size=8, checkpoint_every=5, eval_every=30, eval_batches=1,
                 log_every=5, keep_last=3, eval_recur=[2])
    cfg = s3_config(s3_bucket, "killed", model=slow_model, stages=[stage])
    storage = Storage(cfg.storage)
    stage_path = storage.join("killed", "pretrain")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(r=run_pipeline(cfg, stages=["tokenizer", "pretrain"])))
    thread.start()
    deadline = time.time() + 180
    while time.time() < deadline and not list_checkpoints(storage, stage_path):
        time.sleep(0.2)
    steps_at_kill = [s for s, _ in list_checkpoints(storage, stage_path)]
    assert steps_at_kill and steps_at_kill[0] < 30, "training finished before the worker could be killed"
    pids = _train_worker_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "r" in outcome
    metrics = outcome["r"].stages["pretrain"]["metrics"]
    assert metrics["step"] == 30
    # resumed from a checkpoint at least as new as the newest one present at the kill: at most 5 steps redone
    assert metrics["resumed_from"] >= steps_at_kill[0] > 0
    assert list_checkpoints(storage, stage_path)[0][0] == 30


def test_driver_killed_mid_dag_then_rerun_skips_finished_stages(ray_cluster, s3_bucket, tmp_path):
    cfg = s3_config(s3_bucket, "driver")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(cfg.to_yaml())
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "rnc", "pipeline", "run", "--config", str(config_file),
                             "--stages", "tokenizer,pretrain,mid"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    storage = Storage(cfg.storage)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if PipelineManifest.load(storage, "driver").stages["pretrain"].status == "finished":
                    break
            except (FileNotFoundError, KeyError):
                pass
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    before = PipelineManifest.load(storage, "driver")
    assert before.stages["pretrain"].status == "finished"
    pretrain_ended = before.stages["pretrain"].ended_at
    result = run_pipeline(cfg, stages=["tokenizer", "pretrain", "mid"])
    assert result.skipped[:2] == ["tokenizer", "pretrain"]
    after = PipelineManifest.load(storage, "driver")
    assert after.stages["pretrain"].ended_at == pretrain_ended  # not rerun
    assert after.stages["mid"].status == "finished"


def test_unreachable_s3_fails_fast_naming_the_endpoint(ray_cluster, s3_bucket):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    cfg = s3_config(s3_bucket, "down", endpoint=f"http://127.0.0.1:{port}")
    # The probe's connect timeout is cfg.storage.connect_timeout_s (5 s); a closed port fails at once.
    with pytest.raises(StorageUnreachable, match=f"127.0.0.1:{port}"):
        run_pipeline(cfg)
    # nothing started: no manifest, no stage directory in the real bucket
    direct = Storage(StorageConfig(uri=f"s3://{s3_bucket.name}/runs", endpoint_url=s3_bucket.endpoint_url))
    assert not direct.exists(direct.join("down"))


def test_transient_s3_failures_during_checkpoint_upload_are_retried(ray_cluster, s3_bucket, tmp_path):
    with FaultyProxy(s3_bucket.endpoint_url, fail_first=3, mode="reset", methods={"PUT"},
                     path_contains="step_000003") as proxy:
        cfg = s3_config(s3_bucket, "flaky", endpoint=proxy.url,
                        stages=[dict(name="pretrain", steps=6, batch_size=2, checkpoint_every=3, eval_every=6,
                                     eval_batches=1, log_every=3)])
        result = run_pipeline(cfg, stages=["tokenizer", "pretrain"])
    assert proxy.failures == 3
    assert result.stages["pretrain"]["status"] == "finished"
    direct = Storage(StorageConfig(uri=f"s3://{s3_bucket.name}/runs", endpoint_url=s3_bucket.endpoint_url))
    steps = [s for s, _ in list_checkpoints(direct, direct.join("flaky", "pretrain"))]
    assert steps == [6, 3]
    for _, path in list_checkpoints(direct, direct.join("flaky", "pretrain")):
        fetch_checkpoint(path, storage=direct, cache_dir=tmp_path)
