"""Checkpoints, the one home: the directory format, the manifest verifier, storage (local folder or S3) with retries,
resume discovery and the node cache. Imported by pipelines/ and serve/; imports neither.

    layout.py    file names inside a checkpoint, the parts a reader asks for
    manifest.py  the one verifier (VerifiedCheckpoint), sha256, manifest writing
    format.py    save_checkpoint / load_checkpoint and friends (torch + safetensors only)
    uri.py       StorageConfig: s3:// URIs and local paths, AWS environment resolved at use time
    retry.py     the retry policy of storage requests
    local.py     local-folder backend          s3.py  S3 backend (boto3) and the pyarrow filesystem for Ray
    storage.py   Storage: the facade over a backend (paths, JSON, directory upload with the manifest last)
    fetch.py     fetch_checkpoint: URI or path -> verified local checkpoint, node cache, partial fetches
    resume.py    list_checkpoints, fetch_latest_valid, checkpoint_name

Importing the package pulls in no boto3, pyarrow or Ray: a machine with only torch, safetensors, tiktoken and numpy
can save, verify and load checkpoints. `Storage` loads its backends when first used.
"""

from .errors import CheckpointError, StorageError, StorageUnreachable
from .fetch import default_cache_dir, fetch_checkpoint
from .format import LoadedCheckpoint, load_checkpoint, load_config, load_tokenizer, save_checkpoint
from .layout import ALL_PARTS, INFERENCE_PARTS, INGRESS_PARTS, MANIFEST
from .manifest import VerifiedCheckpoint, sha256_file, verify_checkpoint
from .resume import checkpoint_name, fetch_latest_valid, list_checkpoints
from .uri import StorageConfig


def __getattr__(name: str):
    if name == "Storage":  # pyarrow (and boto3 for S3) on first use only
        from .storage import Storage

        return Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_PARTS", "INFERENCE_PARTS", "INGRESS_PARTS", "MANIFEST", "CheckpointError", "LoadedCheckpoint", "Storage",
    "StorageConfig", "StorageError", "StorageUnreachable", "VerifiedCheckpoint", "checkpoint_name",
    "default_cache_dir", "fetch_checkpoint", "fetch_latest_valid", "list_checkpoints", "load_checkpoint",
    "load_config", "load_tokenizer", "save_checkpoint", "sha256_file", "verify_checkpoint",
]
