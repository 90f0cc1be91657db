"""The local-folder backend: file primitives on absolute paths, atomic writes, no retries (retry.py does those)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .errors import StorageUnreachable
from .retry import is_transient


class LocalBackend:
    errors: tuple[type[BaseException], ...] = (OSError,)
    transient = staticmethod(is_transient)  # network filesystems time out too

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def get_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def put_bytes(self, path: str, data: bytes) -> None:
        atomic_write(Path(path), lambda f: f.write(data))

    def put_file(self, src: Path, path: str) -> None:
        def copy(f: Any) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        atomic_write(Path(path), copy)

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

    def filesystem(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def check_reachable(self, root: str, timeout_s: float) -> None:
        """The root, or its nearest existing ancestor (Ray creates the rest), must be a writable directory."""
        probe = Path(root)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StorageUnreachable(f"local storage {root!r}: {str(probe)!r} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StorageUnreachable(f"local storage {root!r}: {str(probe)!r} is not writable")


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
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
