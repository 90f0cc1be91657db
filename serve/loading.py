"""Checkpoint URI -> verified local directory -> Engine. Runs once per replica at start-up.

S3 checkpoints are downloaded into a node-local cache keyed by the URI and the remote manifest's content, so the
replicas of several tiers on one node download the weights once (a file lock serialises them) and a re-published
checkpoint under the same URI is fetched again. Every load verifies each file against the manifest's sha256, so a
corrupted cache entry or a half-written local directory is refused, never served.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recursive_model.checkpoint import CheckpointError, load_checkpoint, load_config, verify_checkpoint
from recursive_model.config import GPTConfig
from recursive_model.engine import Engine
from recursive_model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "rnc-serve-cache"


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def fetch_checkpoint(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Local directory holding the checkpoint at `uri` (a local path is returned as is, S3 goes through the cache).
    Raises CheckpointError when the checkpoint is missing or incomplete."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        return path

    from pipelines.storage import Storage, StorageConfig  # boto3/pyarrow only when the checkpoint is remote

    storage = Storage(StorageConfig(uri=uri))
    try:
        manifest = storage.read_json(storage.join(MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(
            f"{storage.config.uri}: no {MANIFEST} (checkpoint incomplete or not a checkpoint)"
        ) from None
    key = hashlib.sha256((storage.config.uri + "\n" + json.dumps(manifest, sort_keys=True)).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica on this node may be downloading the same checkpoint
        if (target / MANIFEST).is_file():
            logger.info("checkpoint %s: cache hit %s", storage.config.uri, target)
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            t0 = time.perf_counter()
            storage.download_checkpoint(storage.root, tmp)  # verifies every file against the manifest
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            secs = time.perf_counter() - t0
            logger.info("checkpoint %s: downloaded to %s in %.1fs", storage.config.uri, target, secs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    """An Engine ready to serve, and where it came from."""

    engine: Engine
    config: GPTConfig
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path


def load_engine(uri: str, cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu") -> LoadedModel:
    """Fetch, verify and load a checkpoint into an eval-mode Engine."""
    path = fetch_checkpoint(uri, cache_dir)
    ckpt = load_checkpoint(path, device=device, verify=True)
    if ckpt.tokenizer is None:
        raise CheckpointError(f"{uri}: the checkpoint has no tokenizer/ directory; serving needs one")
    ckpt.model.eval()
    return LoadedModel(Engine(ckpt.model, ckpt.tokenizer), ckpt.config, ckpt.tokenizer, ckpt.meta, path)


def load_tokenizer(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Tokenizer, GPTConfig]:
    """Tokenizer and model config of a checkpoint (what the ingress needs to validate and render prompts)."""
    path = fetch_checkpoint(uri, cache_dir)
    verify_checkpoint(path)
    if not (path / "tokenizer").is_dir():
        raise CheckpointError(f"{uri}: the checkpoint has no tokenizer/ directory; serving needs one")
    return Tokenizer.load(path / "tokenizer"), load_config(path)
