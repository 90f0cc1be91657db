"""Checkpoint URI or path -> verified local checkpoint: the one way every reader (training resume, eval, serving)
gets a checkpoint it may load.

A local directory (or a checkpoint on local storage) is verified in place. An S3 checkpoint is copied into a cache
directory keyed by its URI and the content of its manifest: the replicas of several tiers on one node download the
weights once (a file lock serialises them), and a checkpoint re-published under the same URI is fetched again.
Only the files of the requested parts are downloaded (the serve ingress takes config + tokenizer, a replica what
inference needs, training resume everything), and each is hashed once per fetch. A cached copy that does not
verify is fetched again, once; a checkpoint that still fails is refused, never served.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import CheckpointError
from .layout import ALL_PARTS, MANIFEST, check_parts
from .manifest import VerifiedCheckpoint, check_listing, files_of, parse_manifest, verify_checkpoint

if TYPE_CHECKING:  # storage.py imports pyarrow: loaded only when a checkpoint is remote
    from .storage import Storage

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Node-local cache of fetched checkpoints (the name predates its use outside serving)."""
    return Path(tempfile.gettempdir()) / "rnc-serve-cache"


def is_remote(source: str) -> bool:
    """True for a URI that names remote storage (anything with a scheme but file://)."""
    return "://" in source and not source.startswith("file://")


def fetch_checkpoint(
    source: str | os.PathLike[str],
    parts: Iterable[str] = ALL_PARTS,
    *,
    storage: Storage | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VerifiedCheckpoint:
    """A verified local copy of the checkpoint at `source` holding at least `parts` (layout.py).

    `source` is a local directory, `file://` or `s3://bucket/key[?endpoint_override=...]` URI, or, with `storage`,
    a path in that storage. Remote copies go under `cache_dir` (default: default_cache_dir()); pass a temporary
    directory for a one-off copy. Raises CheckpointError naming the file for a missing, incomplete, corrupt or
    unsafe checkpoint; StorageError when the storage fails.
    """
    parts = check_parts(parts)
    src = os.fspath(source)
    if storage is None:
        if not is_remote(src):
            path = Path(urlsplit(src).path if src.startswith("file://") else src).expanduser()
            return verify_checkpoint(path, parts)
        from .storage import Storage
        from .uri import StorageConfig

        storage = Storage(StorageConfig(uri=src))
        src = storage.root
    if not storage.is_s3:
        return verify_checkpoint(storage.normpath(src), parts)  # local storage: verified where it lies
    return _fetch_remote(storage, storage.normpath(src), parts, Path(cache_dir) if cache_dir else default_cache_dir())


def _fetch_remote(storage: Storage, path: str, parts: frozenset[str], cache_root: Path) -> VerifiedCheckpoint:
    uri = storage.uri_for(path)
    try:
        manifest_bytes = storage.read_bytes(f"{path}/{MANIFEST}")
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri}: {MANIFEST} missing (checkpoint incomplete or not a checkpoint)", file=MANIFEST
        ) from None
    files = parse_manifest(manifest_bytes, uri)
    # The same rules as on disk, checked on the listing before a byte of weights moves.
    remote = storage.list_files(path)
    check_listing(remote, files, uri)
    absent = sorted(set(files) - set(remote))
    if absent:
        raise CheckpointError(f"{uri}/{absent[0]}: listed in the manifest but missing", file=absent[0])
    wanted = files_of(files, parts)

    key = hashlib.sha256(uri.encode() + b"\n" + manifest_bytes).hexdigest()[:20]
    cache_root.mkdir(parents=True, exist_ok=True)
    entry = cache_root / key
    with open(cache_root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process on this node may be fetching the same checkpoint
        for attempt in (1, 2):
            reused = entry.is_dir() and any(entry.iterdir())
            entry.mkdir(exist_ok=True)
            if not (entry / MANIFEST).is_file() or (entry / MANIFEST).read_bytes() != manifest_bytes:
                (entry / MANIFEST).write_bytes(manifest_bytes)
            missing = [rel for rel in wanted if not os.path.lexists(entry / rel)]
            for rel in missing:
                try:
                    storage.download_file(f"{path}/{rel}", entry / rel)
                except FileNotFoundError:
                    raise CheckpointError(f"{uri}/{rel}: listed in the manifest but missing", file=rel) from None
            try:
                ckpt = verify_checkpoint(entry, parts, source=uri)
            except CheckpointError as exc:
                shutil.rmtree(entry, ignore_errors=True)  # nothing that failed stays in the cache
                if attempt == 2 or not reused:
                    raise  # freshly downloaded and still bad: the stored checkpoint is at fault
                logger.warning("checkpoint %s: cached copy refused (%s); fetching it again", uri, exc)
                continue
            hit = "fetched" if missing else "cache hit"
            logger.info("checkpoint %s: %s %s (%d files, parts %s)", uri, hit, entry, len(wanted), sorted(parts))
            return ckpt
    raise AssertionError("unreachable")
