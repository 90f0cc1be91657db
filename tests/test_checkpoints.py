"""The checkpoints package: the directory format, the one verifier and its integrity rules, storage (a local folder
and a real S3 protocol server, moto, on loopback) with retries and faults, the node cache and partial fetches."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
import torch

import checkpoints.manifest
from checkpoints import (
    ALL_PARTS,
    INFERENCE_PARTS,
    INGRESS_PARTS,
    CheckpointError,
    Storage,
    StorageConfig,
    StorageError,
    StorageUnreachable,
    fetch_checkpoint,
    fetch_latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_config,
    load_tokenizer,
    save_checkpoint,
    verify_checkpoint,
)
from checkpoints.manifest import write_manifest
from recursive_model import GPT, GPTConfig, Tokenizer
from tests.faulty_proxy import FaultyProxy

if TYPE_CHECKING:
    from tests.conftest import S3Bucket  # fixture type only: importing conftest at runtime loads it twice

TEXT = ["the recurrent block is applied r times to the state.", "hello world 12 + 34 = 46", "ab" * 50] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(TEXT), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, sequence_len=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


@pytest.fixture
def ckpt(model: GPT, tokenizer: Tokenizer, tmp_path: Path) -> Path:
    """A real checkpoint with every part, optimizer state included."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_checkpoint(tmp_path / "ck", model, model.config, tokenizer, {"stage": "sft", "step": 7},
                           optimizer_state={"optimizers": [opt.state_dict()]})


def make_checkpoint(directory: Path, size: int = 50_000) -> Path:
    """A checkpoint-shaped directory (random bytes for weights) with a valid manifest.json."""
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


def set_manifest_files(directory: Path, files: dict[str, str]) -> None:
    (directory / "manifest.json").write_text(json.dumps({"files": files, "format": 1}))


def manifest_files(directory: Path) -> dict[str, str]:
    return json.loads((directory / "manifest.json").read_text())["files"]


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The relative paths the verifier hashes, in order (to prove each file is hashed once, or not at all)."""
    calls: list[str] = []
    real = checkpoints.manifest.sha256_file

    def counting(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
        p = Path(path)
        calls.append(f"{p.parent.name}/{p.name}" if p.parent.name == "tokenizer" else p.name)
        return real(path, chunk)

    monkeypatch.setattr(checkpoints.manifest, "sha256_file", counting)
    return calls


# ---------------------------------------------------------------------------------------------------- format
def test_checkpoint_round_trip_with_optimizer_state(model, tokenizer, tmp_path):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, tokenizer.vocab_size, (2, 16))
    model.train()
    model(x, targets=x).backward()
    opt.step()
    model.eval()
    d = save_checkpoint(tmp_path / "ck", model, model.config, tokenizer, {"stage": "sft", "step": 7},
                        optimizer_state={"optimizers": [opt.state_dict()]})
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "manifest.json", "meta.json", "model.safetensors", "optimizer.pt", "tokenizer"]
    assert set(manifest_files(d)) == {"model.safetensors", "config.json", "meta.json", "optimizer.pt",
                                      "tokenizer/tokenizer.json"}
    loaded = load_checkpoint(d, load_optimizer=True)
    assert loaded.config == model.config and loaded.meta["step"] == 7
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert loaded.tokenizer.encode("hello world") == tokenizer.encode("hello world")
    restored = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded.optimizer_state["optimizers"][0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert not [p for p in d.parent.iterdir() if p.name != "ck"]  # no temp directory left beside it


def test_checkpoint_verification_names_the_bad_file(ckpt):
    weights = ckpt / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch") as info:
        load_checkpoint(ckpt)
    assert info.value.file == "model.safetensors"
    weights.write_bytes(original)
    verify_checkpoint(ckpt)
    (ckpt / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: listed in the manifest but missing") as info:
        verify_checkpoint(ckpt)
    assert info.value.file == "tokenizer/tokenizer.json"
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json missing") as info:
        load_checkpoint(ckpt)
    assert info.value.file == "manifest.json"


def test_resave_removes_stale_files(model, tokenizer, ckpt):
    assert (ckpt / "optimizer.pt").is_file()
    save_checkpoint(ckpt, model, model.config, None, {"step": 8})  # no optimizer state, no tokenizer this time
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "manifest.json", "meta.json", "model.safetensors"]
    assert set(manifest_files(ckpt)) == {"config.json", "meta.json", "model.safetensors"}
    loaded = load_checkpoint(ckpt, load_optimizer=True)
    assert loaded.optimizer_state is None and loaded.tokenizer is None and loaded.meta == {"step": 8}


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_checkpoint(tmp_path / "mine", model, model.config)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ------------------------------------------------------------------------------------------ integrity rules
@pytest.mark.parametrize("extra", ["tokenizer/merges.txt", "optimizer.pt", "notes/readme.md"])
def test_unlisted_files_are_refused(ckpt, extra):
    """A file the manifest does not vouch for is never loaded: the checkpoint is refused."""
    if extra == "optimizer.pt":
        files = manifest_files(ckpt)
        del files["optimizer.pt"]
        set_manifest_files(ckpt, files)  # a stale optimizer.pt beside a manifest that does not list it
    else:
        (ckpt / extra).parent.mkdir(exist_ok=True)
        (ckpt / extra).write_text("not from this run")
    for load in (lambda: load_checkpoint(ckpt), lambda: load_checkpoint(ckpt, load_optimizer=True),
                 lambda: fetch_checkpoint(ckpt, INGRESS_PARTS)):
        with pytest.raises(CheckpointError, match="not listed in the manifest") as info:
            load()
        assert info.value.file == extra


@pytest.mark.parametrize("listed", ["meta.json", "tokenizer/tokenizer.json"])
def test_files_dropped_from_the_manifest_are_not_loaded(ckpt, listed):
    files = manifest_files(ckpt)
    del files[listed]
    set_manifest_files(ckpt, files)
    with pytest.raises(CheckpointError, match="not listed in the manifest") as info:
        load_checkpoint(ckpt)
    assert info.value.file == listed


UNSAFE = ["../evil", "/etc/passwd", "tokenizer/../../evil", "./config.json", "a//b", "tokenizer/", "C:evil"]


@pytest.mark.parametrize("path", UNSAFE)
def test_manifest_paths_must_stay_inside(ckpt, path):
    files = manifest_files(ckpt)
    files[path] = "0" * 64
    set_manifest_files(ckpt, files)
    with pytest.raises(CheckpointError, match="unsafe path") as info:
        verify_checkpoint(ckpt)
    assert info.value.file == "manifest.json" and repr(path) in str(info.value)


def test_symlinks_leading_outside_are_refused(ckpt, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tok = ckpt / "tokenizer" / "tokenizer.json"
    shutil.copy(tok, outside / "tokenizer.json")  # same bytes, so the sha256 would match
    tok.unlink()
    tok.symlink_to(outside / "tokenizer.json")
    with pytest.raises(CheckpointError, match="symlink leading outside") as info:
        load_checkpoint(ckpt)
    assert info.value.file == "tokenizer/tokenizer.json"

    tok.unlink()
    (ckpt / "tokenizer").rmdir()
    (ckpt / "tokenizer").symlink_to(outside, target_is_directory=True)  # the whole directory, linked
    with pytest.raises(CheckpointError, match="symlink leading outside") as info:
        load_checkpoint(ckpt)
    assert info.value.file == "tokenizer"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _recertify(d: Path) -> None:
    """Rewrite the manifest over the current files: the failures below must come from loading, not hashing."""
    write_manifest(d)


LOAD_FAILURES = [
    # (case, file, how to break it, fragment of the message)
    ("pickle payload", "optimizer.pt", lambda p: torch.save({"x": _Evil()}, p), "Unpickl"),
    ("config not JSON", "config.json", lambda p: p.write_text("{not json"), "cannot load the model config"),
    ("unknown config field", "config.json",
     lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "n_layerz": 3})), "n_layerz"),
    ("weights not safetensors", "model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "cannot load the weights"),
    ("weights of another shape", "model.safetensors", None, "size mismatch"),
    ("meta not JSON", "meta.json", lambda p: p.write_text("[1, 2"), "cannot load meta"),
    ("meta not an object", "meta.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    ("tokenizer not JSON", "tokenizer/tokenizer.json", lambda p: p.write_text("{"), "cannot load the tokenizer"),
]


@pytest.mark.parametrize(("case", "rel", "breaks", "fragment"), LOAD_FAILURES, ids=[c[0] for c in LOAD_FAILURES])
def test_every_load_failure_is_a_checkpoint_error_naming_the_file(ckpt, tokenizer, case, rel, breaks, fragment):
    if breaks is None:  # a valid safetensors file whose tensors do not fit the config
        other = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, sequence_len=64, n_embd=64))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(ckpt / rel))
    else:
        breaks(ckpt / rel)
    _recertify(ckpt)
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_checkpoint(ckpt, load_optimizer=True)
    assert info.value.file == rel and f"{rel}:" in str(info.value)


def test_a_missing_file_is_a_checkpoint_error_naming_it(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: listed in the manifest but missing") as info:
        load_checkpoint(ckpt)
    assert info.value.file == "config.json"


@pytest.mark.parametrize(
    ("manifest", "fragment"),
    [
        ("{", "not valid JSON"),
        ('{"files": {"model.safetensors": "x"}}', "format-1 manifest"),
        ('{"files": {"config.json": "' + "0" * 64 + '"}, "format": 1}', "does not list model.safetensors"),
        ('{"files": {"model.safetensors": "abc", "config.json": "abc"}, "format": 1}', "64 lowercase hex"),
    ],
)
def test_malformed_manifests_are_refused(ckpt, manifest, fragment):
    (ckpt / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=fragment) as info:
        verify_checkpoint(ckpt)
    assert info.value.file == "manifest.json"


# ------------------------------------------------------------------------------------------- partial copies
def test_a_partial_copy_verifies_what_it_holds_and_knows_what_it_lacks(ckpt, tokenizer, tmp_path, hashed):
    part = tmp_path / "ingress"
    for rel in ("manifest.json", "config.json", "tokenizer/tokenizer.json"):
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpt / rel, part / rel)
    got = verify_checkpoint(part, INGRESS_PARTS)
    assert sorted(hashed) == ["config.json", "tokenizer/tokenizer.json"]
    assert got.verified == INGRESS_PARTS and got.missing == {"weights", "meta", "optimizer"}
    assert load_config(got).n_embd == 32
    assert load_tokenizer(got).encode("hello world") == tokenizer.encode("hello world")
    with pytest.raises(CheckpointError, match="model.safetensors: not verified") as info:
        load_checkpoint(got)
    assert info.value.file == "model.safetensors"
    with pytest.raises(CheckpointError, match="listed in the manifest but missing"):
        verify_checkpoint(part, INFERENCE_PARTS)  # the parts it lacks cannot be asked of it
    (part / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json: sha256 mismatch"):
        verify_checkpoint(part, INGRESS_PARTS)


def test_ingress_parts_of_a_full_checkpoint_hash_only_config_and_tokenizer(ckpt, hashed):
    got = fetch_checkpoint(ckpt, INGRESS_PARTS)
    assert sorted(hashed) == ["config.json", "tokenizer/tokenizer.json"]
    with pytest.raises(CheckpointError, match="optimizer.pt: not verified"):
        got.file("optimizer.pt")


def test_loading_a_verified_checkpoint_hashes_each_file_once(ckpt, hashed):
    load_checkpoint(fetch_checkpoint(ckpt, INFERENCE_PARTS))
    assert sorted(hashed) == ["config.json", "meta.json", "model.safetensors", "tokenizer/tokenizer.json"]
    hashed.clear()
    load_checkpoint(ckpt, load_optimizer=True)  # a directory: verified here, optimizer included
    assert sorted(hashed) == ["config.json", "meta.json", "model.safetensors", "optimizer.pt",
                              "tokenizer/tokenizer.json"]


def test_unknown_parts_are_a_value_error(ckpt):
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['weigths'\]"):
        verify_checkpoint(ckpt, ["config", "weigths"])


def test_importing_checkpoints_needs_no_boto3_pyarrow_or_ray(tmp_path):
    code = (
        "import sys\n"
        "for name in ('ray', 'boto3', 'botocore', 'pyarrow', 's3transfer'): sys.modules[name] = None\n"
        "from recursive_model import GPT, GPTConfig\n"
        "assert 'checkpoints' not in sys.modules  # the model package never imports checkpoints\n"
        "from checkpoints import save_checkpoint, load_checkpoint, fetch_checkpoint, StorageConfig\n"
        "m = GPT(GPTConfig.from_preset('tiny'))\n"
        f"save_checkpoint({str(tmp_path / 'c')!r}, m, m.config)\n"
        f"assert load_checkpoint(fetch_checkpoint({str(tmp_path / 'c')!r})).config == m.config\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('pipelines', 'serve')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- storage config
def test_config_is_pure_and_resolves_endpoint_region_and_addressing_at_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2/")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    cfg = StorageConfig("s3://my-bucket//runs/")
    assert (cfg.uri, cfg.endpoint_url, cfg.region, cfg.path_style) == ("s3://my-bucket/runs", None, None, None)
    res = cfg.resolved()
    assert (res.uri, res.endpoint_url, res.region, res.path_style) == (
        "s3://my-bucket/runs",
        "http://s3-specific:2",
        "eu-west-1",
        True,
    )
    assert Storage(cfg).config == res  # Storage resolves when it is built, i.e. where it is used

    res = StorageConfig("s3://my-bucket").resolved(environ={})
    assert (res.endpoint_url, res.region, res.path_style) == (None, "us-east-1", False)  # real AWS: virtual hosts

    # The pyarrow-style URI Ray also accepts: endpoint and region move into the fields.
    cfg = StorageConfig("s3://my-bucket/p?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-central-1")
    assert (cfg.uri, cfg.endpoint_url, cfg.region) == ("s3://my-bucket/p", "http://127.0.0.1:9000", "eu-central-1")

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL_S3 must look like http"):
        StorageConfig("s3://my-bucket").resolved()


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
    got = fetch_checkpoint(storage.uri_for(dest), storage=storage, cache_dir=tmp_path / "cache")
    assert got.files.keys() == {"model.safetensors", "config.json", "meta.json", "tokenizer/tokenizer.json"}
    assert got.verified == {"config", "weights", "meta", "tokenizer"} and not got.missing
    assert tree(got.path) == tree(src)
    assert (got.path == Path(dest)) is not storage.is_s3  # local storage is verified where it lies

    storage.upload_dir(src, storage.join("run", "checkpoint_000002"))
    storage.delete_dir(dest)
    assert not storage.exists(dest) and not storage.is_complete_checkpoint(dest)
    assert storage.list_dirs(storage.join("run")) == ["checkpoint_000002"]
    with pytest.raises(ValueError, match="strictly inside"):
        storage.delete_dir(storage.root)


def test_republishing_a_checkpoint_under_the_same_path_leaves_no_stale_file(
    storage: Storage, model: GPT, tmp_path: Path
) -> None:
    # A checkpoint with optimizer state, then one without it, uploaded to the same path: the old optimizer.pt must
    # go, or the new manifest (which does not list it) would refuse the checkpoint.
    dest = storage.join("run", "final")
    with_opt = save_checkpoint(tmp_path / "a", model, model.config, None, {"v": 1},
                               optimizer_state={"step": torch.zeros(1)})
    storage.upload_dir(with_opt, dest)
    without = save_checkpoint(tmp_path / "b", model, model.config, None, {"v": 2})
    storage.upload_dir(without, dest)
    assert storage.list_files(dest) == ["config.json", "manifest.json", "meta.json", "model.safetensors"]
    got = fetch_checkpoint(dest, ALL_PARTS, storage=storage, cache_dir=tmp_path / "cache")
    assert "optimizer" not in got.parts and load_checkpoint(got).meta == {"v": 2}


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
    got = fetch_checkpoint(dest, storage=direct, cache_dir=tmp_path / "cache")
    assert tree(got.path) == tree(src)


def test_download_survives_transient_failures(s3_storage: Storage, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_checkpoint(tmp_path / "src")
    dest = s3_storage.join("ckpt")
    s3_storage.upload_dir(src, dest)
    with FaultyProxy(
        s3_bucket.endpoint_url, fail_first=2, status=500, methods={"GET"}, path_contains="model.safetensors"
    ) as proxy:
        storage = Storage(s3_bucket.config("runs", endpoint_url=proxy.url))
        got = fetch_checkpoint(dest, storage=storage, cache_dir=tmp_path / "cache")
    assert proxy.failures == 2
    assert tree(got.path) == tree(src)


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
    with pytest.raises(CheckpointError, match="manifest.json missing") as info:
        fetch_checkpoint(dest, storage=direct, cache_dir=tmp_path / "cache")
    assert info.value.file == "manifest.json"


def upload_tamperable(storage: Storage, bucket: S3Bucket, tmp_path: Path):
    """A checkpoint-shaped directory uploaded to S3, a raw client to tamper with it, and its key prefix."""
    src = make_checkpoint(tmp_path / "src")
    dest = storage.join("ckpt")
    storage.upload_dir(src, dest)
    return src, dest, boto3.client("s3", endpoint_url=bucket.endpoint_url), dest.split("/", 1)[1]


def test_flipped_byte_is_detected(s3_storage: Storage, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    _, dest, s3, prefix = upload_tamperable(s3_storage, s3_bucket, tmp_path)
    data = bytearray(s3.get_object(Bucket=s3_bucket.name, Key=f"{prefix}/model.safetensors")["Body"].read())
    data[1234] ^= 0x01
    s3.put_object(Bucket=s3_bucket.name, Key=f"{prefix}/model.safetensors", Body=bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch") as info:
        fetch_checkpoint(dest, storage=s3_storage, cache_dir=cache)
    assert info.value.file == "model.safetensors"
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing that failed stays in the cache

    s3.delete_object(Bucket=s3_bucket.name, Key=f"{prefix}/tokenizer/tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json: listed in the manifest but missing"):
        fetch_checkpoint(dest, INGRESS_PARTS, storage=s3_storage, cache_dir=cache)


def test_remote_manifest_rules_are_the_local_ones(s3_storage: Storage, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src, dest, s3, prefix = upload_tamperable(s3_storage, s3_bucket, tmp_path)
    s3.put_object(Bucket=s3_bucket.name, Key=f"{prefix}/optimizer.pt", Body=b"stale")
    with pytest.raises(CheckpointError, match="optimizer.pt: not listed in the manifest") as info:
        fetch_checkpoint(dest, INGRESS_PARTS, storage=s3_storage, cache_dir=tmp_path / "cache")
    assert info.value.file == "optimizer.pt"
    s3.delete_object(Bucket=s3_bucket.name, Key=f"{prefix}/optimizer.pt")

    files = manifest_files(src)
    files["../evil"] = "0" * 64
    s3.put_object(Bucket=s3_bucket.name, Key=f"{prefix}/manifest.json",
                  Body=json.dumps({"files": files, "format": 1}).encode())
    with pytest.raises(CheckpointError, match="unsafe path '../evil'"):
        fetch_checkpoint(dest, storage=s3_storage, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil").exists()


# ----------------------------------------------------------------------------- node cache and partial fetches
def _s3_uri(bucket: S3Bucket, key: str) -> str:
    return f"{bucket.uri}/{key}?endpoint_override={bucket.endpoint_url.removeprefix('http://')}&scheme=http"


def test_s3_checkpoint_is_fetched_once_per_node_in_parts(ckpt, s3_bucket: S3Bucket, tmp_path: Path, hashed) -> None:
    storage = Storage(s3_bucket.config())
    storage.upload_dir(ckpt, storage.join("run", "final"))
    uri, cache = _s3_uri(s3_bucket, "run/final"), tmp_path / "cache"

    ingress = fetch_checkpoint(uri, INGRESS_PARTS, cache_dir=cache)  # the ingress: config + tokenizer only
    assert sorted(tree(ingress.path)) == ["config.json", "manifest.json", "tokenizer/tokenizer.json"]
    assert ingress.missing == {"weights", "meta", "optimizer"}
    assert sorted(hashed) == ["config.json", "tokenizer/tokenizer.json"]

    hashed.clear()
    replica = fetch_checkpoint(uri, INFERENCE_PARTS, cache_dir=cache)  # a replica: adds what inference needs
    assert replica.path == ingress.path and "optimizer.pt" not in tree(replica.path)
    assert replica.missing == {"optimizer"}
    assert sorted(hashed) == ["config.json", "meta.json", "model.safetensors", "tokenizer/tokenizer.json"]
    weights = os.stat(replica.path / "model.safetensors")

    hashed.clear()
    loaded = load_checkpoint(fetch_checkpoint(uri, INFERENCE_PARTS, cache_dir=cache))  # cache hit: no download
    assert os.stat(replica.path / "model.safetensors").st_ino == weights.st_ino
    assert loaded.config.sequence_len == 64 and loaded.meta["step"] == 7
    assert sorted(hashed) == ["config.json", "meta.json", "model.safetensors", "tokenizer/tokenizer.json"]

    with pytest.raises(CheckpointError, match="manifest.json missing"):
        fetch_checkpoint(_s3_uri(s3_bucket, "nothing-here"), cache_dir=cache)


def test_a_damaged_cache_entry_is_fetched_again(ckpt, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    storage = Storage(s3_bucket.config())
    storage.upload_dir(ckpt, storage.join("c"))
    uri, cache = _s3_uri(s3_bucket, "c"), tmp_path / "cache"
    first = fetch_checkpoint(uri, INFERENCE_PARTS, cache_dir=cache)
    weights = first.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    (first.path / "stray.tmp").write_text("left by a crashed download")
    again = fetch_checkpoint(uri, INFERENCE_PARTS, cache_dir=cache)
    assert again.path == first.path and not (again.path / "stray.tmp").exists()
    assert weights.read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_resume_discovery_skips_a_corrupt_newest_checkpoint(ckpt, storage: Storage, tmp_path: Path, caplog):
    stage = storage.join("run", "pretrain")
    for name in ("step_000003", "step_000006", "step_000006-r1"):
        storage.upload_dir(ckpt, f"{stage}/{name}")
    storage.write_json(f"{stage}/step_000009/meta.json", {})  # no manifest: an upload that never finished
    assert [s for s, _ in list_checkpoints(storage, stage)] == [6, 6, 3]
    for name in ("step_000006", "step_000006-r1"):  # both copies of step 6 lose a byte
        broken = tmp_path / name
        shutil.copytree(ckpt, broken)
        weights = broken / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        storage.upload_dir(broken, f"{stage}/{name}")  # with the original manifest: the weights now mismatch
    echoed: list[str] = []
    step, got = fetch_latest_valid(storage, stage, tmp_path / "resume", echo=echoed.append)
    assert step == 3 and got.verified == ALL_PARTS - {"other"}
    assert load_checkpoint(got, load_optimizer=True).optimizer_state is not None
    assert len(echoed) == 2 and all("model.safetensors" in line for line in echoed)
    assert "step_000006-r1" in caplog.text
