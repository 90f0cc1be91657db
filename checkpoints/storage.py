"""Run storage: a local folder or an S3 prefix (AWS, MinIO, moto) holding checkpoints and pipeline manifests.

One `Storage` object answers two needs:

* Ray Train/Tune write checkpoints through a pyarrow filesystem: `ray_storage_path()` + `ray_storage_filesystem()`
  go straight into `ray.train.RunConfig(storage_path=..., storage_filesystem=...)`.
* The pipeline driver and the serving side move checkpoint directories and small JSON files themselves
  (`upload_dir`, `download_file`, `read_json`, ...), every request under the retry policy (retry.py).

Paths taken by the methods are filesystem paths as `join()` returns them and as Ray reports them
(`bucket/prefix/...` on S3, absolute paths locally); full URIs (`s3://bucket/...`, `file:///...`) are accepted too.

A checkpoint directory is complete when its manifest is present: `upload_dir` deletes a stale remote manifest first
and uploads the manifest last, after every other file arrived. Verification is fetch.py's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .layout import MANIFEST
from .local import LocalBackend
from .retry import RetryPolicy
from .uri import StorageConfig

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class Backend(Protocol):
    """File primitives on filesystem paths; no retries here."""

    errors: tuple[type[BaseException], ...]  # what a request may raise (the retry policy's scope)

    def transient(self, exc: BaseException) -> bool: ...
    def exists(self, path: str) -> bool: ...
    def get_bytes(self, path: str) -> bytes: ...
    def put_bytes(self, path: str, data: bytes) -> None: ...
    def put_file(self, src: Path, path: str) -> None: ...
    def get_file(self, path: str, dst: Path) -> None: ...
    def delete(self, path: str) -> None: ...
    def delete_tree(self, path: str) -> None: ...
    def list_files(self, path: str) -> list[str]: ...
    def list_dirs(self, path: str) -> list[str]: ...
    def filesystem(self) -> pafs.FileSystem: ...
    def check_reachable(self, root: str, timeout_s: float) -> None: ...


class Storage:
    """A run storage root plus the operations the pipelines and serving need on it. Picklable (rebuilt from its
    resolved config, so a Ray worker addresses the same endpoint as the driver that built it)."""

    def __init__(self, config: StorageConfig | str):
        cfg = config if isinstance(config, StorageConfig) else StorageConfig(uri=config)
        self.config = cfg.resolved()  # the environment is read here, when the storage is about to be used
        self.is_s3 = self.config.is_s3
        if self.is_s3:
            from .s3 import S3Backend  # boto3 only when the storage is remote

            self.root = self.config.uri.removeprefix("s3://")  # "bucket/prefix", the pyarrow/Ray path form
            self.bucket = self.root.split("/", 1)[0]
            self._backend: Backend = S3Backend(self.config)
        else:
            self.root = self.config.uri
            self.bucket = None
            self._backend = LocalBackend()
        backend = self._backend
        self.retry_policy = RetryPolicy(self.config.retries, self.config.backoff_s, backend.errors, backend.transient)
        self.filesystem = backend.filesystem()

    def __reduce__(self) -> tuple[type[Storage], tuple[StorageConfig]]:
        # boto3 clients do not pickle; the config is all a Ray worker needs to rebuild the same storage.
        return (Storage, (self.config,))

    def __repr__(self) -> str:
        where = f", endpoint={self.config.endpoint_url}" if self.config.endpoint_url else ""
        return f"Storage({self.config.uri!r}{where})"

    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        return self.retry_policy.call(what, fn)

    # ----------------------------------------------------------------------------------------- paths and Ray
    def join(self, *parts: str) -> str:
        """Filesystem path of `parts` under the root, e.g. `join("run", "pipeline.json")`."""
        segments = [self.root.rstrip("/")] + [p.strip("/") for p in parts if p and p.strip("/")]
        return "/".join(segments)

    def uri_for(self, path: str) -> str:
        """Full URI of a filesystem path (`s3://bucket/key` or the absolute local path). Carries no endpoint, so
        the same URI stays valid when the endpoint differs between laptop and cluster."""
        path = self.normpath(path)
        return f"s3://{path}" if self.is_s3 else path

    def ray_storage_path(self) -> str:
        """`storage_path` for `ray.train.RunConfig` / `ray.tune.RunConfig`, used with `ray_storage_filesystem()`
        (Ray wants the scheme stripped when a filesystem is given)."""
        return self.root

    def ray_storage_filesystem(self) -> pafs.FileSystem:
        """`storage_filesystem` for `ray.train.RunConfig`: endpoint, addressing, timeouts and SDK retries set."""
        return self.filesystem

    def normpath(self, path: str) -> str:
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
        p = self.normpath(path)
        return self._retry(f"exists({self.uri_for(p)})", lambda: self._backend.exists(p))

    def read_bytes(self, path: str) -> bytes:
        """The content of the file at `path`; FileNotFoundError if absent."""
        p = self.normpath(path)
        return self._retry(f"read {self.uri_for(p)}", lambda: self._backend.get_bytes(p))

    def read_json(self, path: str) -> Any:
        """Parsed JSON at `path`; FileNotFoundError if absent."""
        return json.loads(self.read_bytes(path))

    def write_json(self, path: str, obj: Any) -> None:
        """Write `obj` as JSON. Readers never see a partial file: temp + rename locally, a single PUT on S3."""
        data = (json.dumps(obj, indent=2) + "\n").encode()
        p = self.normpath(path)
        self._retry(f"write {self.uri_for(p)}", lambda: self._backend.put_bytes(p, data))

    def list_dirs(self, path: str) -> list[str]:
        """Sorted names of the immediate subdirectories of `path` ([] if it does not exist)."""
        p = self.normpath(path)
        return sorted(self._retry(f"list {self.uri_for(p)}", lambda: self._backend.list_dirs(p)))

    def list_files(self, path: str) -> list[str]:
        """Sorted relative paths of every file below `path` ([] if nothing is there)."""
        p = self.normpath(path)
        return sorted(self._retry(f"list {self.uri_for(p)}", lambda: self._backend.list_files(p)))

    # ---------------------------------------------------------------------------------------- reachability
    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, before a long run starts, if storage cannot be used.

        Raises StorageUnreachable with a one-line message naming the endpoint and bucket (or local path) when the
        endpoint is down or hangs, the bucket is missing, or the credentials are missing or refused. Takes at most
        about 2 * `timeout_s` (connect + read timeout, no retries).
        """
        self._backend.check_reachable(self.root, timeout_s)

    # ------------------------------------------------------------------------------------------- directories
    def upload_dir(self, local_dir: str | os.PathLike[str], dest_path: str) -> list[str]:
        """Upload every file under `local_dir` to `dest_path`; returns the relative paths uploaded.

        Each file is retried with exponential backoff on transient errors. A `manifest.json` at the top of
        `local_dir` is uploaded last, only after all other files succeeded, and any stale remote manifest is
        deleted first, so a checkpoint whose upload failed midway is never "complete". With a manifest, files
        under `dest_path` that the upload does not hold are deleted before the manifest goes up: a checkpoint
        re-published under the same path keeps no file of the earlier one (which its manifest would not list).
        Raises StorageError when a file still fails after `config.retries` retries.
        """
        local = Path(local_dir)
        if not local.is_dir():
            raise NotADirectoryError(f"upload_dir: local_dir {str(local)!r} is not a directory")
        dest = self.normpath(dest_path)
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        if MANIFEST in files:
            manifest_key = f"{dest}/{MANIFEST}"
            self._retry(f"delete {self.uri_for(manifest_key)}", lambda: self._backend.delete(manifest_key))
            files = [f for f in files if f != MANIFEST] + [MANIFEST]
        t0 = time.perf_counter()
        for rel in files:
            if rel == MANIFEST:
                for stale in sorted(set(self.list_files(dest)) - set(files)):
                    key = f"{dest}/{stale}"
                    self._retry(f"delete {self.uri_for(key)}", lambda key=key: self._backend.delete(key))
            src, key = local / rel, f"{dest}/{rel}"
            self._retry(f"upload {self.uri_for(key)}", lambda src=src, key=key: self._backend.put_file(src, key))
        logger.info("uploaded %d files to %s in %.2fs", len(files), self.uri_for(dest), time.perf_counter() - t0)
        return files

    def download_file(self, path: str, dst: str | os.PathLike[str]) -> None:
        """Download one file (parents of `dst` created); readers of `dst` never see a partial file."""
        p, target = self.normpath(path), Path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._retry(f"download {self.uri_for(p)}", lambda: self._backend.get_file(p, target))

    def download_dir(self, src_path: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Download every file under `src_path` into `local_dir` (created); returns the relative paths.

        Retries per file like `upload_dir`; `manifest.json` is fetched last so a partial local copy does not look
        complete either. FileNotFoundError if nothing exists under `src_path`.
        """
        src = self.normpath(src_path)
        files = self.list_files(src)
        if not files:
            raise FileNotFoundError(f"download_dir: nothing under {self.uri_for(src)}")
        for rel in sorted(files, key=lambda rel: (rel == MANIFEST, rel)):
            self.download_file(f"{src}/{rel}", Path(local_dir) / rel)
        return files

    def local_dir(self, path: str, local_dir: str | os.PathLike[str]) -> Path:
        """A local directory with the files under `path`: the directory itself on local storage, else a download
        into `local_dir`. For plain directories (the tokenizer stage's output); checkpoints go through fetch.py."""
        if not self.is_s3:
            return Path(self.normpath(path))
        self.download_dir(path, local_dir)
        return Path(local_dir)

    def delete_dir(self, path: str) -> None:
        """Delete everything under `path`, which must lie strictly inside the root. The manifest goes first, so an
        interrupted delete leaves an incomplete checkpoint rather than a "complete" one with files missing."""
        p = self.normpath(path)
        if not p.startswith(self.root.rstrip("/") + "/"):
            raise ValueError(f"delete_dir: {self.uri_for(p)} is not strictly inside the storage root {self.config.uri}")
        manifest = f"{p}/{MANIFEST}"
        self._retry(f"delete {self.uri_for(manifest)}", lambda: self._backend.delete(manifest))
        self._retry(f"delete {self.uri_for(p)}", lambda: self._backend.delete_tree(p))

    def is_complete_checkpoint(self, path: str) -> bool:
        """True when the checkpoint at `path` has its manifest, i.e. its upload finished."""
        return self.exists(f"{self.normpath(path)}/{MANIFEST}")
