"""Run storage: a local folder or an S3 prefix (AWS, MinIO, moto) holding checkpoints and pipeline manifests.

One `Storage` object answers two needs:

* Ray Train/Tune write checkpoints through a pyarrow filesystem: `ray_storage_path()` + `ray_storage_filesystem()`
  go straight into `ray.train.RunConfig(storage_path=..., storage_filesystem=...)`.
* The pipeline driver and the serving side move whole checkpoint directories and small JSON files themselves
  (`upload_dir`, `download_dir`, `read_json`, ...). On S3 those go through boto3 because its errors are
  structured (HTTP status, error code, connection vs. timeout), which is what deciding "transient, retry" needs.

Paths taken by the methods are filesystem paths as `join()` returns them and as Ray reports them
(`bucket/prefix/...` on S3, absolute paths locally); full URIs (`s3://bucket/...`, `file:///...`) are accepted too.

Checkpoint completeness: a checkpoint directory is complete when its `manifest.json`
(`{"files": {relpath: sha256}, "format": 1}`) is present. `upload_dir` therefore deletes a stale remote manifest
first and uploads the manifest last, after every other file arrived.

MinIO and other S3 clones: boto3 >= 1.36 (and recent AWS C++ SDKs inside pyarrow) send CRC checksums by default,
which older servers reject. Set ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and
``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required`` in the environment (of the driver and of every Ray worker, e.g.
via runtime_env env_vars); both clients read them. Credentials always come from the standard AWS chain
(env vars, profile, instance role) and are never put in URIs, messages or logs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
import boto3.exceptions
import botocore.exceptions as bce
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from s3transfer.exceptions import RetriesExceededError

from recursive_model.checkpoint import sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_MAX_BACKOFF_S = 30.0
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Error codes S3 (and clones) use for "try again later"; anything 5xx is retried as well.
_TRANSIENT_CODES = {
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
}
_T = TypeVar("_T")


class StorageError(RuntimeError):
    """A storage operation failed (after retries, when the error was transient)."""


class StorageUnreachable(StorageError):
    """The storage endpoint is down, the bucket is missing, or the credentials are refused."""


class CheckpointCorrupt(StorageError):
    """A checkpoint's manifest is missing or a file does not match its recorded sha256."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file  # relative path of the offending file, None when the manifest itself is the problem


@dataclass
class StorageConfig:
    """Where a run's checkpoints and manifests live. Env-dependent defaults are resolved at construction, so a
    pickled config (e.g. shipped to Ray workers) carries the concrete endpoint and region."""

    uri: str  # s3://bucket/prefix[?endpoint_override=host:port&scheme=http&region=...] or a local directory
    endpoint_url: str | None = None  # http(s)://host:port; None -> AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL
    region: str | None = None  # None -> AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1
    path_style: bool | None = None  # None -> True when an endpoint is set (MinIO/moto), else virtual-host addressing
    retries: int = 4  # extra attempts per file/request on transient errors (5xx, resets, timeouts)
    backoff_s: float = 0.5  # first retry delay; doubles per attempt (capped at 30 s, jittered)
    connect_timeout_s: float = 5.0  # short, so a dead endpoint fails in seconds instead of hanging
    read_timeout_s: float = 60.0  # per socket read; large parts of a big checkpoint need time

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(
                f"StorageConfig.uri must be a non-empty string (s3://bucket/prefix or a path), got {self.uri!r}"
            )
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"StorageConfig.retries must be an int >= 0, got {self.retries!r}")
        if self.backoff_s < 0:
            raise ValueError(f"StorageConfig.backoff_s must be >= 0, got {self.backoff_s!r}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StorageConfig.{name} must be > 0, got {getattr(self, name)!r}")

        uri = self.uri.strip()
        if "://" not in uri or uri.startswith("file://"):
            if self.endpoint_url is not None:
                raise ValueError(f"StorageConfig.endpoint_url is only valid with an s3:// uri, got uri={uri!r}")
            path = urlsplit(uri).path if uri.startswith("file://") else uri
            # Ray workers run with another cwd: a local root must be absolute.
            self.uri = os.path.abspath(os.path.expanduser(path))
        else:
            self._resolve_s3(uri)

    def _resolve_s3(self, uri: str) -> None:
        """Validate an s3:// uri; move its query parameters into the fields; fill endpoint/region from the env."""
        parts = urlsplit(uri)
        if parts.scheme != "s3":
            raise ValueError(
                f"StorageConfig.uri: scheme {parts.scheme!r} is not supported (use s3:// or a local path), got {uri!r}"
            )
        if "@" in parts.netloc:
            raise ValueError(
                "StorageConfig.uri must not embed credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            )
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"StorageConfig.uri: {bucket!r} is not a valid bucket name (3-63 chars of a-z, 0-9, "
                f"'.', '-'), got {uri!r}"
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_override", "scheme", "region"}
        if unknown:
            raise ValueError(
                f"StorageConfig.uri: unsupported query parameter(s) {sorted(unknown)}; "
                f"allowed: endpoint_override, scheme, region"
            )
        if "endpoint_override" in query:
            endpoint = query["endpoint_override"]
            if "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            if self.endpoint_url is not None and self.endpoint_url.rstrip("/") != endpoint.rstrip("/"):
                raise ValueError(
                    f"StorageConfig.endpoint_url={self.endpoint_url!r} conflicts with "
                    f"endpoint_override={endpoint!r} in the uri"
                )
            self.endpoint_url = endpoint
        if "region" in query and self.region is None:
            self.region = query["region"]
        prefix = "/".join(p for p in parts.path.split("/") if p)
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

        if self.endpoint_url is None:
            self.endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        if self.endpoint_url is not None:
            ep = urlsplit(self.endpoint_url)
            if ep.scheme not in ("http", "https") or not ep.netloc:
                raise ValueError(
                    f"StorageConfig.endpoint_url must look like http(s)://host:port, got {self.endpoint_url!r}"
                )
            if "@" in ep.netloc:
                raise ValueError("StorageConfig.endpoint_url must not embed credentials")
            self.endpoint_url = self.endpoint_url.rstrip("/")
        if self.region is None:
            self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if self.path_style is None:
            self.path_style = self.endpoint_url is not None

    @property
    def is_s3(self) -> bool:
        """True for an s3:// uri, False for a local directory."""
        return self.uri.startswith("s3://")


class Storage:
    """A run storage root plus the operations the pipelines need on it. Picklable (rebuilt from its config)."""

    def __init__(self, config: StorageConfig | str):
        self.config = config if isinstance(config, StorageConfig) else StorageConfig(uri=config)
        self.is_s3 = self.config.is_s3
        if self.is_s3:
            self.root = self.config.uri.removeprefix("s3://")  # "bucket/prefix", the pyarrow/Ray path form
            self.bucket = self.root.split("/", 1)[0]
            self._backend: _Backend = _S3Backend(self.config)
        else:
            self.root = self.config.uri
            self.bucket = None
            self._backend = _LocalBackend()
        self.filesystem = self._make_filesystem()

    def __reduce__(self) -> tuple[type[Storage], tuple[StorageConfig]]:
        # boto3 clients do not pickle; the config is all a Ray worker needs to rebuild the same storage.
        return (Storage, (self.config,))

    def __repr__(self) -> str:
        where = f", endpoint={self.config.endpoint_url}" if self.config.endpoint_url else ""
        return f"Storage({self.config.uri!r}{where})"

    def _make_filesystem(self) -> pafs.FileSystem:
        if not self.is_s3:
            return pafs.LocalFileSystem()
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.endpoint_url is not None:
            ep = urlsplit(cfg.endpoint_url)
            # pyarrow wants host:port and the scheme separately; it ignores AWS_ENDPOINT_URL on its own.
            kwargs.update(endpoint_override=ep.netloc + ep.path, scheme=ep.scheme)
        return pafs.S3FileSystem(
            region=cfg.region,
            connect_timeout=cfg.connect_timeout_s,
            force_virtual_addressing=not cfg.path_style,
            # Ray's checkpoint upload has no retries of its own (ray issue 55350): let the AWS SDK retry.
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries + 1),
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------- paths and Ray
    def join(self, *parts: str) -> str:
        """Filesystem path of `parts` under the root, e.g. `join("run", "pipeline.json")`."""
        segments = [self.root.rstrip("/")] + [p.strip("/") for p in parts if p and p.strip("/")]
        return "/".join(segments)

    def uri_for(self, path: str) -> str:
        """Full URI of a filesystem path (`s3://bucket/key` or the absolute local path). Carries no endpoint, so
        the same URI stays valid when the endpoint differs between laptop and cluster."""
        path = self._path(path)
        return f"s3://{path}" if self.is_s3 else path

    def ray_storage_path(self) -> str:
        """`storage_path` for `ray.train.RunConfig` / `ray.tune.RunConfig`, used with `ray_storage_filesystem()`
        (Ray wants the scheme stripped when a filesystem is given)."""
        return self.root

    def ray_storage_filesystem(self) -> pafs.FileSystem:
        """`storage_filesystem` for `ray.train.RunConfig`: endpoint, addressing, timeouts and SDK retries set."""
        return self.filesystem

    def _path(self, path: str) -> str:
        """Normalise a URI or filesystem path to the filesystem form; refuse paths outside this storage's bucket
        (S3) or relative paths (local), which would silently resolve against the wrong root."""
        path = os.fspath(path)
        if self.is_s3:
            path = path.removeprefix("s3://").split("?", 1)[0].strip("/")
            if path != self.bucket and not path.startswith(f"{self.bucket}/"):
                raise ValueError(f"path {path!r} is not in bucket {self.bucket!r}; build paths with Storage.join()")
            return path
        path = urlsplit(path).path if path.startswith("file://") else path
        if not os.path.isabs(path):
            raise ValueError(f"local storage paths must be absolute, got {path!r}; build paths with Storage.join()")
        return os.path.normpath(path)

    # ------------------------------------------------------------------------------------------- small files
    def exists(self, path: str) -> bool:
        """True if a file or directory exists at `path` (on S3 a directory exists when an object lives under it)."""
        p = self._path(path)
        return self._retry(f"exists({self.uri_for(p)})", lambda: self._backend.exists(p))

    def read_json(self, path: str) -> Any:
        """Parsed JSON at `path`; FileNotFoundError if absent."""
        p = self._path(path)
        data = self._retry(f"read {self.uri_for(p)}", lambda: self._backend.get_bytes(p))
        return json.loads(data)

    def write_json(self, path: str, obj: Any) -> None:
        """Write `obj` as JSON. Readers never see a partial file: temp + rename locally, a single PUT on S3."""
        data = (json.dumps(obj, indent=2) + "\n").encode()
        p = self._path(path)
        self._retry(f"write {self.uri_for(p)}", lambda: self._backend.put_bytes(p, data))

    def list_dirs(self, path: str) -> list[str]:
        """Sorted names of the immediate subdirectories of `path` ([] if it does not exist)."""
        p = self._path(path)
        return sorted(self._retry(f"list {self.uri_for(p)}", lambda: self._backend.list_dirs(p)))

    # ---------------------------------------------------------------------------------------- reachability
    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, before a long run starts, if storage cannot be used.

        Raises StorageUnreachable with a one-line message naming the endpoint and bucket (or local path) when the
        endpoint is down or hangs, the bucket is missing, or the credentials are missing or refused. Takes at most
        about 2 * `timeout_s` (connect + read timeout, no retries).
        """
        if not self.is_s3:
            _check_local_writable(self.root)
            return
        endpoint = self.config.endpoint_url or f"AWS S3 ({self.config.region})"
        where = f"bucket {self.bucket!r} at {endpoint}"
        client = _s3_client(self.config, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
        try:
            client.head_bucket(Bucket=self.bucket)
        except (bce.NoCredentialsError, bce.PartialCredentialsError) as exc:
            raise StorageUnreachable(
                f"no usable AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from exc
        except bce.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code == "NoSuchBucket":
                msg = f"{where} does not exist"
            elif status == 403:
                msg = f"access denied to {where} (HTTP 403): check the AWS credentials and bucket policy"
            elif status in (301, 307, 400) and self.config.endpoint_url is None:
                msg = f"{where} answered HTTP {status}: is the bucket in region {self.config.region!r}?"
            else:
                msg = f"{where} answered HTTP {status} {code}".rstrip()
            raise StorageUnreachable(msg) from exc
        except bce.BotoCoreError as exc:
            raise StorageUnreachable(
                f"S3 endpoint {endpoint} unreachable for bucket {self.bucket!r} "
                f"(timeout {timeout_s:g}s): {_one_line(exc)}"
            ) from exc

    # --------------------------------------------------------------------------------- checkpoint directories
    def upload_dir(self, local_dir: str | os.PathLike[str], dest_path: str) -> list[str]:
        """Upload every file under `local_dir` to `dest_path`; returns the relative paths uploaded.

        Each file is retried with exponential backoff on transient errors. A `manifest.json` at the top of
        `local_dir` is uploaded last, only after all other files succeeded, and any stale remote manifest is
        deleted first, so a checkpoint whose upload failed midway is never "complete". Raises StorageError when a
        file still fails after `config.retries` retries.
        """
        local = Path(local_dir)
        if not local.is_dir():
            raise NotADirectoryError(f"upload_dir: local_dir {str(local)!r} is not a directory")
        dest = self._path(dest_path)
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        has_manifest = MANIFEST_NAME in files
        if has_manifest:
            manifest_key = f"{dest}/{MANIFEST_NAME}"
            self._retry(f"delete {self.uri_for(manifest_key)}", lambda: self._backend.delete(manifest_key))
            files = [f for f in files if f != MANIFEST_NAME] + [MANIFEST_NAME]
        t0 = time.perf_counter()
        for rel in files:
            src, key = local / rel, f"{dest}/{rel}"
            self._retry(f"upload {self.uri_for(key)}", lambda src=src, key=key: self._backend.put_file(src, key))
        logger.info("uploaded %d files to %s in %.2fs", len(files), self.uri_for(dest), time.perf_counter() - t0)
        return files

    def download_dir(self, src_path: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Download every file under `src_path` into `local_dir` (created); returns the relative paths.

        Retries per file like `upload_dir`; `manifest.json` is fetched last so a partial local copy does not look
        complete either. FileNotFoundError if nothing exists under `src_path`.
        """
        src = self._path(src_path)
        local = Path(local_dir)
        files = self._retry(f"list {self.uri_for(src)}", lambda: self._backend.list_files(src))
        if not files:
            raise FileNotFoundError(f"download_dir: nothing under {self.uri_for(src)}")
        files = sorted(files, key=lambda rel: (rel == MANIFEST_NAME, rel))
        for rel in files:
            dst, key = local / rel, f"{src}/{rel}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._retry(f"download {self.uri_for(key)}", lambda dst=dst, key=key: self._backend.get_file(key, dst))
        return files

    def delete_dir(self, path: str) -> None:
        """Delete everything under `path`, which must lie strictly inside the root. The manifest goes first, so an
        interrupted delete leaves an incomplete checkpoint rather than a "complete" one with files missing."""
        p = self._path(path)
        if not p.startswith(self.root.rstrip("/") + "/"):
            raise ValueError(f"delete_dir: {self.uri_for(p)} is not strictly inside the storage root {self.config.uri}")
        manifest = f"{p}/{MANIFEST_NAME}"
        self._retry(f"delete {self.uri_for(manifest)}", lambda: self._backend.delete(manifest))
        self._retry(f"delete {self.uri_for(p)}", lambda: self._backend.delete_tree(p))

    def is_complete_checkpoint(self, path: str) -> bool:
        """True when the checkpoint at `path` has its manifest, i.e. its upload finished."""
        return self.exists(f"{self._path(path)}/{MANIFEST_NAME}")

    def download_checkpoint(self, src_path: str, local_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Download a checkpoint directory and verify it; returns the manifest's {relpath: sha256}.
        Raises CheckpointCorrupt naming the missing or mismatching file."""
        src = self._path(src_path)
        if not self.is_complete_checkpoint(src):
            raise CheckpointCorrupt(
                f"{self.uri_for(src)} has no {MANIFEST_NAME}: the checkpoint is incomplete", file=MANIFEST_NAME
            )
        self.download_dir(src, local_dir)
        try:
            return verify_checkpoint_dir(local_dir)
        except CheckpointCorrupt as exc:
            raise CheckpointCorrupt(f"{self.uri_for(src)}: {exc}", file=exc.file) from None

    def verify_remote_checkpoint(self, path: str) -> dict[str, str]:
        """Download the checkpoint at `path` to a temp dir and check the sha256 of every file in its manifest.
        Returns the manifest's {relpath: sha256}; raises CheckpointCorrupt naming the offending file."""
        with tempfile.TemporaryDirectory(prefix="rnc-verify-") as tmp:
            return self.download_checkpoint(path, tmp)

    # -------------------------------------------------------------------------------------------- retries
    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run `fn`, retrying transient errors with jittered exponential backoff. FileNotFoundError passes
        through; other storage errors become StorageError naming `what`."""
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except (
                bce.BotoCoreError,
                bce.ClientError,
                boto3.exceptions.Boto3Error,
                OSError,
                RetriesExceededError,
            ) as exc:
                if not _is_transient(exc):
                    raise StorageError(f"{what} failed: {_one_line(exc)}") from exc
                if attempt == attempts:
                    raise StorageError(f"{what} failed after {attempts} attempts: {_one_line(exc)}") from exc
                # Jitter keeps ranks that failed together from retrying in lockstep.
                delay = min(_MAX_BACKOFF_S, self.config.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs", what, attempt, attempts, _one_line(exc), delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


def verify_checkpoint_dir(local_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Check every file listed in `local_dir/manifest.json` against its sha256; returns {relpath: sha256}.
    Raises CheckpointCorrupt naming the missing or mismatching file."""
    root = Path(local_dir)
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{MANIFEST_NAME} is missing in {root}", file=MANIFEST_NAME) from None
    except json.JSONDecodeError as exc:
        raise CheckpointCorrupt(f"{MANIFEST_NAME} in {root} is not valid JSON: {exc}", file=MANIFEST_NAME) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointCorrupt(
            f"{MANIFEST_NAME} in {root} is not a format-{MANIFEST_FORMAT} manifest", file=MANIFEST_NAME
        )
    files: dict[str, str] = manifest["files"]
    for rel, expected in files.items():
        # The manifest may come from a remote store: never let it point outside the directory.
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointCorrupt(f"{MANIFEST_NAME} lists an unsafe path {rel!r}", file=rel)
        path = root / rel
        if not path.is_file():
            raise CheckpointCorrupt(f"{rel} is listed in {MANIFEST_NAME} but missing", file=rel)
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointCorrupt(
                f"{rel} is corrupt: sha256 {actual[:12]}… != manifest {str(expected)[:12]}…", file=rel
            )
    return files


# ------------------------------------------------------------------------------------------------- helpers
def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx/throttling answers, dropped or refused connections, timeouts.
    Follows the cause chain because s3transfer wraps the botocore error (S3UploadFailedError from ClientError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, bce.ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = e.response.get("Error", {}).get("Code", "")
            if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
                return True
        elif isinstance(
            e,
            (
                bce.ConnectionError,
                bce.HTTPClientError,
                bce.IncompleteReadError,
                bce.ChecksumError,
                bce.FlexibleChecksumError,
                RetriesExceededError,
                ConnectionError,
                TimeoutError,
                socket.timeout,
            ),
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_local_writable(root: str) -> None:
    """The root, or its nearest existing ancestor (Ray creates the rest), must be a writable directory."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StorageUnreachable(f"local storage {root!r}: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageUnreachable(f"local storage {root!r}: {str(probe)!r} is not writable")


def _s3_client(cfg: StorageConfig, *, connect_timeout_s: float | None = None, read_timeout_s: float | None = None):
    """A boto3 S3 client with exactly one attempt per call: `Storage._retry` is the only retry layer, so the
    retry count in the config is the real one."""
    boto_cfg = BotoConfig(
        region_name=cfg.region,
        connect_timeout=connect_timeout_s or cfg.connect_timeout_s,
        read_timeout=read_timeout_s or cfg.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path" if cfg.path_style else "virtual"},
    )
    # A fresh session per client: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, config=boto_cfg)


class _Backend(Protocol):
    """File primitives on filesystem paths; no retries here."""

    def exists(self, path: str) -> bool: ...
    def get_bytes(self, path: str) -> bytes: ...
    def put_bytes(self, path: str, data: bytes) -> None: ...
    def put_file(self, src: Path, path: str) -> None: ...
    def get_file(self, path: str, dst: Path) -> None: ...
    def delete(self, path: str) -> None: ...
    def delete_tree(self, path: str) -> None: ...
    def list_files(self, path: str) -> list[str]: ...
    def list_dirs(self, path: str) -> list[str]: ...


class _LocalBackend:
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def get_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def put_bytes(self, path: str, data: bytes) -> None:
        _atomic_write(Path(path), lambda f: f.write(data))

    def put_file(self, src: Path, path: str) -> None:
        def copy(f: Any) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        _atomic_write(Path(path), copy)

    def get_file(self, path: str, dst: Path) -> None:
        self.put_file(Path(path), str(dst))

    def delete(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def delete_tree(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)

    def list_files(self, path: str) -> list[str]:
        root = Path(path)
        return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] if root.is_dir() else []

    def list_dirs(self, path: str) -> list[str]:
        return [e.name for e in os.scandir(path) if e.is_dir()] if os.path.isdir(path) else []


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temp file in the same directory + rename, so readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _S3Backend:
    def __init__(self, cfg: StorageConfig):
        self.client = _s3_client(cfg)
        # One attempt inside s3transfer too (see _s3_client); multipart above 64 MiB for large weight files.
        self.transfer = TransferConfig(multipart_threshold=64 << 20, num_download_attempts=1)

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    @staticmethod
    def _status(exc: bce.ClientError) -> int:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0

    def exists(self, path: str) -> bool:
        bucket, key = self._split(path)
        if key:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except bce.ClientError as exc:
                if self._status(exc) != 404:
                    raise
        # Not an object: a "directory" exists when something lives under it.
        resp = self.client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return resp.get("KeyCount", 0) > 0

    def get_bytes(self, path: str) -> bytes:
        bucket, key = self._split(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except bce.ClientError as exc:
            if self._status(exc) == 404:
                raise FileNotFoundError(f"s3://{path} does not exist") from None
            raise

    def put_bytes(self, path: str, data: bytes) -> None:
        bucket, key = self._split(path)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, src: Path, path: str) -> None:
        bucket, key = self._split(path)
        self.client.upload_file(str(src), bucket, key, Config=self.transfer)

    def get_file(self, path: str, dst: Path) -> None:
        bucket, key = self._split(path)
        try:
            # s3transfer writes to a temp name and renames, so a failed download leaves no partial file.
            self.client.download_file(bucket, key, str(dst), Config=self.transfer)
        except bce.ClientError as exc:
            if self._status(exc) == 404:
                raise FileNotFoundError(f"s3://{path} does not exist") from None
            raise

    def delete(self, path: str) -> None:
        bucket, key = self._split(path)
        self.client.delete_object(Bucket=bucket, Key=key)  # S3 deletes of missing keys succeed

    def delete_tree(self, path: str) -> None:
        # One DeleteObjects call per listing page (both cap at 1000 keys); directory markers go too.
        for _, page in self._list(path, None):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if not keys:
                continue
            bucket, _ = self._split(path)
            errors = self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors")
            if errors:
                raise OSError(f"could not delete {len(errors)} objects under s3://{path}, e.g. {errors[0]}")

    def _list(self, path: str, delimiter: str | None):
        bucket, key = self._split(path)
        prefix = f"{key}/" if key else ""
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            yield prefix, page

    def list_files(self, path: str) -> list[str]:
        # Keys ending in "/" are directory markers made by pyarrow/Ray, not files.
        return [
            obj["Key"][len(prefix) :]
            for prefix, page in self._list(path, None)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]

    def list_dirs(self, path: str) -> list[str]:
        return [
            cp["Prefix"][len(prefix) :].rstrip("/")
            for prefix, page in self._list(path, "/")
            for cp in page.get("CommonPrefixes", [])
        ]
