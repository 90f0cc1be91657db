"""Storage and pipeline manifest against a real S3 protocol server (moto) on loopback and a local folder."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from pipelines.manifest import PipelineManifest, config_hash
from pipelines.storage import (
    CheckpointCorrupt,
    Storage,
    StorageConfig,
    StorageError,
    StorageUnreachable,
    verify_checkpoint_dir,
)
from tests.faulty_proxy import FaultyProxy

if TYPE_CHECKING:
    from tests.conftest import S3Bucket  # fixture type only: importing conftest at runtime loads it twice


def make_checkpoint(directory: Path, size: int = 50_000) -> Path:
    """A checkpoint-shaped directory (DESIGN.md) with a valid manifest.json."""
    files = {
        "model.safetensors": os.urandom(size),
        "config.json": b'{"n_embd": 64}',
        "meta.json": b'{"stage": "pretrain", "step": 3}',
        "tokenizer/tokenizer.json": b'{"merges": []}',
    }
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    manifest = {"files": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}, "format": 1}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """The same test on a local folder and on S3."""
    return request.getfixturevalue(f"{request.param}_storage")


# --------------------------------------------------------------------------------------------------- config
def test_config_resolves_endpoint_region_and_addressing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2/")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    cfg = StorageConfig("s3://my-bucket//runs/")
    assert (cfg.uri, cfg.endpoint_url, cfg.region, cfg.path_style) == (
        "s3://my-bucket/runs",
        "http://s3-specific:2",
        "eu-west-1",
        True,
    )

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    cfg = StorageConfig("s3://my-bucket")
    assert (cfg.endpoint_url, cfg.region, cfg.path_style) == (None, "us-east-1", False)  # real AWS: virtual hosts

    # The pyarrow-style URI Ray also accepts: endpoint and region move into the fields.
    cfg = StorageConfig("s3://my-bucket/p?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-central-1")
    assert (cfg.uri, cfg.endpoint_url, cfg.region) == ("s3://my-bucket/p", "http://127.0.0.1:9000", "eu-central-1")


def test_config_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert StorageConfig("runs").uri == str(tmp_path / "runs")
    assert StorageConfig(f"file://{tmp_path}/x").uri == str(tmp_path / "x")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"uri": ""}, "uri"),
        ({"uri": "gs://bucket/x"}, "uri"),
        ({"uri": "s3://Bad_Bucket/x"}, "uri"),
        ({"uri": "s3://key:secret@bucket/x"}, "uri"),
        ({"uri": "s3://bucket/x?access_key=k"}, "uri"),
        ({"uri": "s3://bucket/x", "endpoint_url": "127.0.0.1:9000"}, "endpoint_url"),
        ({"uri": "/tmp/x", "endpoint_url": "http://127.0.0.1:9000"}, "endpoint_url"),
        ({"uri": "s3://bucket/x", "retries": -1}, "retries"),
        ({"uri": "s3://bucket/x", "backoff_s": -1.0}, "backoff_s"),
        ({"uri": "s3://bucket/x", "connect_timeout_s": 0}, "connect_timeout_s"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        StorageConfig(**kwargs)


def test_uri_credentials_never_echoed() -> None:
    with pytest.raises(ValueError) as info:
        StorageConfig("s3://AKIAFAKE:topsecret@bucket/x")
    assert "topsecret" not in str(info.value) and "AKIAFAKE" not in str(info.value)


def test_paths_join_and_uris(s3_storage: Storage, local_storage: Storage) -> None:
    bucket = s3_storage.bucket
    assert s3_storage.ray_storage_path() == f"{bucket}/runs"
    assert s3_storage.join("run", "/stage/", "") == f"{bucket}/runs/run/stage"
    assert s3_storage.uri_for(s3_storage.join("run")) == f"s3://{bucket}/runs/run"
    assert s3_storage.uri_for(f"s3://{bucket}/runs/run") == f"s3://{bucket}/runs/run"  # URIs accepted too
    with pytest.raises(ValueError, match="not in bucket"):
        s3_storage.exists("runs/run")  # a relative path would silently address bucket "runs"
    assert local_storage.join("a", "b") == f"{local_storage.root}/a/b"
    with pytest.raises(ValueError, match="absolute"):
        local_storage.exists("a/b")


# ---------------------------------------------------------------------------------------------- json + dirs
def test_json_roundtrip_and_listing(storage: Storage) -> None:
    path = storage.join("run", "pipeline.json")
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError):
        storage.read_json(path)
    storage.write_json(path, {"a": [1, 2.5, None], "b": "ü"})
    storage.write_json(path, {"a": [1, 2.5, None], "b": "ü", "v": 2})  # overwrite in place
    assert storage.read_json(path) == {"a": [1, 2.5, None], "b": "ü", "v": 2}
    assert storage.exists(path) and storage.exists(storage.join("run"))
    storage.write_json(storage.join("run", "ckpt_b", "x.json"), {})
    storage.write_json(storage.join("run", "ckpt_a", "x.json"), {})
    assert storage.list_dirs(storage.join("run")) == ["ckpt_a", "ckpt_b"]
    assert storage.list_dirs(storage.join("missing")) == []
    if not storage.is_s3:  # no temp files left behind by the atomic write
        assert sorted(os.listdir(storage.join("run"))) == ["ckpt_a", "ckpt_b", "pipeline.json"]


def test_checkpoint_dir_roundtrip(storage: Storage, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src")
    dest = storage.join("run", "checkpoint_000001")
    uploaded = storage.upload_dir(src, dest)
    assert uploaded[-1] == "manifest.json"  # the manifest goes last
    assert storage.is_complete_checkpoint(dest)
    assert storage.verify_remote_checkpoint(storage.uri_for(dest)).keys() == {
        "model.safetensors",
        "config.json",
        "meta.json",
        "tokenizer/tokenizer.json",
    }
    storage.download_checkpoint(dest, tmp_path / "back")
    assert tree(tmp_path / "back") == tree(src)

    storage.upload_dir(src, storage.join("run", "checkpoint_000002"))
    storage.delete_dir(dest)
    assert not storage.exists(dest) and not storage.is_complete_checkpoint(dest)
    assert storage.list_dirs(storage.join("run")) == ["checkpoint_000002"]
    with pytest.raises(ValueError, match="strictly inside"):
        storage.delete_dir(storage.root)


def test_storage_pickles_for_ray_workers(s3_storage: Storage) -> None:
    s3_storage.write_json(s3_storage.join("x.json"), {"ok": True})
    clone = pickle.loads(pickle.dumps(s3_storage))
    assert clone.config == s3_storage.config and clone.read_json(clone.join("x.json")) == {"ok": True}
    fs = pickle.loads(pickle.dumps(s3_storage.ray_storage_filesystem()))
    assert fs.get_file_info(s3_storage.join("x.json")).size > 0  # the filesystem Ray ships to workers


# ------------------------------------------------------------------------------------------- reachability
def test_reachable_ok(s3_storage: Storage, local_storage: Storage) -> None:
    s3_storage.check_reachable(timeout_s=2)
    local_storage.check_reachable()


def test_unreachable_closed_port_fails_fast(s3_bucket: S3Bucket) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    storage = Storage(s3_bucket.config("runs", endpoint_url=endpoint))
    with pytest.raises(StorageUnreachable, match=f"127.0.0.1:{port}") as info:
        storage.check_reachable(timeout_s=2)
    assert "\n" not in str(info.value) and s3_bucket.name in str(info.value)
    assert "testing" not in str(info.value)  # the fake secret key never shows up


def test_unreachable_hanging_endpoint_times_out(s3_bucket: S3Bucket) -> None:
    # Accepts TCP connections (kernel backlog) but never answers: only a read timeout ends the probe.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        storage = Storage(s3_bucket.config("runs", endpoint_url=endpoint))
        errors: list[BaseException] = []

        def probe() -> None:
            try:
                storage.check_reachable(timeout_s=1)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(60)  # liveness only: without a read timeout the probe would hang forever
        assert not worker.is_alive(), "check_reachable hung on an endpoint that never answers"
        assert len(errors) == 1 and isinstance(errors[0], StorageUnreachable) and endpoint in str(errors[0])


def test_missing_bucket(s3_server: str) -> None:
    storage = Storage(StorageConfig("s3://no-such-bucket/runs", endpoint_url=s3_server, retries=0))
    with pytest.raises(StorageUnreachable, match=r"'no-such-bucket' at http://127\.0\.0\.1:\d+ does not exist"):
        storage.check_reachable()
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.write_json(storage.join("x.json"), {})  # not transient: fails at once, no retries


def test_refused_credentials(s3_bucket: S3Bucket) -> None:
    # moto accepts any key, so the 403 a real server gives for bad credentials comes from the proxy.
    with FaultyProxy(s3_bucket.endpoint_url, fail_first=1, status=403) as proxy:
        with pytest.raises(StorageUnreachable, match="access denied.*credentials"):
            Storage(s3_bucket.config(endpoint_url=proxy.url)).check_reachable()


def test_local_unreachable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageUnreachable, match="not a directory"):
        Storage(str(tmp_path / "file" / "runs")).check_reachable()


# ------------------------------------------------------------------------------------- retries and faults
@pytest.mark.parametrize("mode", ["status", "reset"])
def test_upload_survives_transient_failures(s3_bucket: S3Bucket, tmp_path: Path, mode: str) -> None:
    src = make_checkpoint(tmp_path / "src")
    with FaultyProxy(s3_bucket.endpoint_url, fail_first=3, mode=mode, status=503, methods={"PUT", "POST"}) as proxy:
        storage = Storage(s3_bucket.config("runs", endpoint_url=proxy.url, retries=3))
        dest = storage.join("run", "ckpt")
        storage.upload_dir(src, dest)
    assert proxy.failures == 3
    failed = [r for r in proxy.seen if r.outcome != "forwarded"]
    assert {r.method for r in failed} == {"PUT"}
    # The first file was tried 4 times (3 failures + success), so retries are per file.
    assert len({r.path for r in failed}) == 1
    direct = Storage(s3_bucket.config("runs"))
    direct.verify_remote_checkpoint(dest)
    direct.download_dir(dest, tmp_path / "back")
    assert tree(tmp_path / "back") == tree(src)


def test_download_survives_transient_failures(s3_storage: Storage, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src")
    dest = s3_storage.join("ckpt")
    s3_storage.upload_dir(src, dest)
    with FaultyProxy(
        s3_bucket.endpoint_url, fail_first=2, status=500, methods={"GET"}, path_contains="model.safetensors"
    ) as proxy:
        storage = Storage(s3_bucket.config("runs", endpoint_url=proxy.url))
        storage.download_checkpoint(dest, tmp_path / "back")
    assert proxy.failures == 2
    assert tree(tmp_path / "back") == tree(src)


def test_upload_failure_leaves_checkpoint_incomplete(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src")
    direct = Storage(s3_bucket.config("runs"))
    dest = direct.join("run", "ckpt")
    direct.upload_dir(src, dest)  # an earlier complete upload to the same place
    assert direct.is_complete_checkpoint(dest)

    with FaultyProxy(
        s3_bucket.endpoint_url, fail_first=1000, mode="reset", methods={"PUT"}, path_contains="model.safetensors"
    ) as proxy:
        storage = Storage(s3_bucket.config("runs", endpoint_url=proxy.url, retries=2))
        with pytest.raises(StorageError, match="model.safetensors.*after 3 attempts"):
            storage.upload_dir(src, dest)
    assert proxy.failures == 3
    assert not direct.is_complete_checkpoint(dest)  # stale manifest removed, new one never written
    assert not any("manifest.json" in r.path and r.method == "PUT" for r in proxy.seen)
    with pytest.raises(CheckpointCorrupt, match="no manifest.json"):
        direct.verify_remote_checkpoint(dest)


def test_flipped_byte_is_detected(s3_storage: Storage, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src")
    dest = s3_storage.join("ckpt")
    s3_storage.upload_dir(src, dest)
    s3 = boto3.client("s3", endpoint_url=s3_bucket.endpoint_url)
    key = dest.split("/", 1)[1] + "/model.safetensors"
    data = bytearray(s3.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read())
    data[1234] ^= 0x01
    s3.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(data))
    with pytest.raises(CheckpointCorrupt, match=r"model\.safetensors is corrupt") as info:
        s3_storage.verify_remote_checkpoint(dest)
    assert info.value.file == "model.safetensors"

    s3.delete_object(Bucket=s3_bucket.name, Key=dest.split("/", 1)[1] + "/tokenizer/tokenizer.json")
    s3.put_object(Bucket=s3_bucket.name, Key=key, Body=(src / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointCorrupt, match="tokenizer/tokenizer.json is listed in manifest.json but missing"):
        s3_storage.verify_remote_checkpoint(dest)


def test_manifest_paths_cannot_escape(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"../evil": "0" * 64}, "format": 1}))
    with pytest.raises(CheckpointCorrupt, match="unsafe"):
        verify_checkpoint_dir(tmp_path)


# ------------------------------------------------------------------------------------- pipeline manifest
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
