"""Resume discovery: the step directories of a stage, newest first, and the newest one that verifies.

A stage writes `<stage_path>/step_XXXXXX` (or `step_XXXXXX-rN` when a corrupt or partial directory of that name is
in the way); a directory counts once its manifest is there.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .fetch import fetch_checkpoint
from .layout import ALL_PARTS
from .manifest import VerifiedCheckpoint

if TYPE_CHECKING:
    from .storage import Storage

logger = logging.getLogger(__name__)
STEP_DIR_RE = re.compile(r"^step_(\d{6})(?:-r(\d+))?$")


def list_checkpoints(storage: Storage, stage_path: str) -> list[tuple[int, str]]:
    """Complete checkpoints (manifest present) of a stage, newest first, as (step, path)."""
    if not storage.exists(stage_path):
        return []
    found = []
    for name in storage.list_dirs(stage_path):
        name = name.rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR_RE.match(name)
        path = f"{stage_path}/{name}"
        if m and storage.is_complete_checkpoint(path):
            found.append((int(m.group(1)), int(m.group(2) or 0), path))
    return [(step, path) for step, _, path in sorted(found, reverse=True)]


def fetch_latest_valid(
    storage: Storage,
    stage_path: str,
    local_dir: str | os.PathLike[str],
    echo: Callable[[str], None] | None = None,
) -> tuple[int, VerifiedCheckpoint] | None:
    """The newest checkpoint of a stage that verifies, fetched whole (optimizer state included) under `local_dir`
    when remote; corrupt ones are skipped with a warning (logged, and passed to `echo` for progress output)."""
    for step, path in list_checkpoints(storage, stage_path):
        try:
            return step, fetch_checkpoint(path, ALL_PARTS, storage=storage, cache_dir=local_dir)
        except CheckpointError as exc:
            logger.warning("skipping corrupt checkpoint %s: %s", storage.uri_for(path), exc)
            if echo is not None:
                echo(f"WARNING: skipping corrupt checkpoint {storage.uri_for(path)}: {exc}")
    return None


def checkpoint_name(storage: Storage, stage_path: str, step: int) -> str:
    """`step_000100`, or `step_000100-r1` if a (corrupt or partial) directory of that name exists already."""
    base, n = f"step_{step:06d}", 0
    name = base
    while storage.exists(f"{stage_path}/{name}"):
        n += 1
        name = f"{base}-r{n}"
    return name
