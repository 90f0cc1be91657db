"""The exceptions of the checkpoints package (no heavy imports: the format modules raise them too)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or unreadable. The message names the directory or URI and the
    file; `file` is that file's path relative to the checkpoint directory (None when no single file is to blame,
    e.g. the directory does not exist)."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


class StorageError(RuntimeError):
    """A storage operation failed (after retries, when the error was transient)."""


class StorageUnreachable(StorageError):
    """The storage endpoint is down, the bucket is missing, or the credentials are refused."""
