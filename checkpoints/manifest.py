"""The checkpoint manifest and the one verifier.

A checkpoint directory holds exactly the files its `manifest.json` lists (`{"files": {relpath: sha256}, "format": 1}`),
and nothing is read from it before the file being read matched its sha256:

* every listed path stays inside the directory (no `..`, no absolute path, no symlink leading out);
* a file in the directory that the manifest does not list refuses the checkpoint (a stale `optimizer.pt`, a
  tokenizer from another run);
* the files of the parts being loaded (layout.py) must all be present and match.

A partial local copy (the serve ingress fetches config + tokenizer only) holds the manifest and the files of some
parts: it verifies what it holds, and `VerifiedCheckpoint.missing` names the parts it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import CheckpointError
from .layout import ALL_PARTS, FORMAT_VERSION, MANIFEST, REQUIRED, check_parts, part_of

_SHA256_HEX = frozenset("0123456789abcdef")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_of(files: Iterable[str], parts: Iterable[str]) -> list[str]:
    """The paths among `files` that belong to `parts`, sorted."""
    wanted = frozenset(parts)
    return sorted(rel for rel in files if part_of(rel) in wanted)


def is_safe_path(rel: object) -> bool:
    """True for a relative, normalised posix path that cannot leave the directory it is joined to."""
    if not isinstance(rel, str) or not rel or rel == MANIFEST or any(c in rel for c in "\\\0:"):
        return False
    p = PurePosixPath(rel)
    # as_posix() == rel refuses "./x", "a//b" and a trailing "/"; ":" above refuses Windows drives ("C:x").
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel


def parse_manifest(data: bytes | str, where: str) -> dict[str, str]:
    """{relpath: sha256} of manifest JSON read from `where` (a directory or URI, for messages); CheckpointError
    naming manifest.json when it is malformed, lists an unsafe path or lacks the weights or the config."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: {MANIFEST} is not valid JSON ({exc})", file=MANIFEST) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION or not isinstance(raw.get("files"), dict):
        raise CheckpointError(
            f"{where}: {MANIFEST} is not a format-{FORMAT_VERSION} manifest ({{\"files\": {{path: sha256}}, "
            f'"format": {FORMAT_VERSION}}})',
            file=MANIFEST,
        )
    files: dict[str, str] = raw["files"]
    for rel, digest in files.items():
        if not is_safe_path(rel):
            raise CheckpointError(
                f"{where}: {MANIFEST} lists an unsafe path {rel!r} "
                "(paths must be relative, normalised and stay inside the checkpoint directory)",
                file=MANIFEST,
            )
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise CheckpointError(
                f"{where}: {MANIFEST} entry {rel!r} has sha256={digest!r}; allowed: 64 lowercase hex digits",
                file=MANIFEST,
            )
    for rel in REQUIRED:
        if rel not in files:
            raise CheckpointError(f"{where}: {MANIFEST} does not list {rel}", file=MANIFEST)
    return dict(files)


def read_manifest(directory: str | os.PathLike[str], where: str | None = None) -> dict[str, str]:
    path = Path(directory) / MANIFEST
    where = where or str(directory)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{where}: {MANIFEST} missing (checkpoint incomplete or not a checkpoint)", file=MANIFEST
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{where}: {MANIFEST} is unreadable ({exc})", file=MANIFEST) from exc
    return parse_manifest(data, where)


def manifest_json(files: dict[str, str]) -> str:
    return json.dumps({"files": files, "format": FORMAT_VERSION}, indent=2, sort_keys=True)


def write_manifest(directory: str | os.PathLike[str], files: dict[str, str] | None = None) -> dict[str, str]:
    """Write `manifest.json` (default: the sha256 of every file now in `directory`) through a temp file + rename,
    so a reader never sees half a manifest; returns {relpath: sha256}."""
    d = Path(directory)
    if files is None:
        files = {rel: sha256_file(d / rel) for rel in sorted(walk_files(d)) if rel != MANIFEST}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(manifest_json(files))
    os.replace(tmp, d / MANIFEST)
    return files


def walk_files(directory: Path) -> Iterator[str]:
    """Relative posix paths of every file (and every symlink, to a file or a directory) under `directory`, without
    following symlinks."""
    for top, dirs, names in os.walk(directory, followlinks=False):
        base = Path(top)
        for name in names + [d for d in dirs if (base / d).is_symlink()]:
            yield (base / name).relative_to(directory).as_posix()


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A local checkpoint directory whose `verified` parts matched the manifest; `missing` are parts of the
    checkpoint this copy does not hold (a partial fetch). Loading from it hashes nothing again."""

    path: Path
    files: dict[str, str]  # the manifest: relpath -> sha256
    verified: frozenset[str]
    missing: frozenset[str]
    source: str  # where it came from (URI or directory), for messages

    @property
    def parts(self) -> frozenset[str]:
        """The parts the checkpoint has (one saved without a tokenizer has no "tokenizer" part)."""
        return frozenset(part_of(rel) for rel in self.files)

    def has(self, part: str) -> bool:
        return part in self.parts

    def file(self, rel: str) -> Path:
        """Local path of the listed file `rel`; CheckpointError unless its part was verified in this copy."""
        if rel not in self.files:
            raise CheckpointError(f"{self.source}: {rel} is not part of this checkpoint", file=rel)
        if part_of(rel) not in self.verified:
            held = ", ".join(sorted(self.verified)) or "nothing"
            raise CheckpointError(
                f"{self.source}/{rel}: not verified in this copy ({self.path} holds {held}); "
                f"fetch or verify it with the {part_of(rel)!r} part",
                file=rel,
            )
        return self.path / rel


def check_listing(listing: Iterable[str], files: dict[str, str], where: str) -> None:
    """The on-disk rule applied to a remote listing: every file there is listed in the manifest (an object the
    manifest does not vouch for is never fetched, and the checkpoint is refused)."""
    for rel in sorted(listing):
        if rel != MANIFEST and rel not in files:
            raise CheckpointError(
                f"{where}/{rel}: not listed in the manifest (a checkpoint holds exactly the files of its manifest)",
                file=rel,
            )


def verify_checkpoint(
    directory: str | os.PathLike[str], parts: Iterable[str] = ALL_PARTS, source: str | None = None
) -> VerifiedCheckpoint:
    """Check the local checkpoint `directory` against its manifest, hashing the files of `parts`.

    Refuses, with a CheckpointError naming the file: no or a malformed manifest, an unsafe listed path, a file or
    symlink the manifest does not list, a symlink leading outside the directory, a listed file of `parts` missing or
    not matching its sha256. Files of other parts may be absent (a partial copy); they are neither hashed nor
    loadable from the result. `source` names the checkpoint in messages (default: the directory).
    """
    parts = check_parts(parts)
    d = Path(directory)
    where = source or str(d)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {where}: no such directory")
    files = read_manifest(d, where)
    root = d.resolve()
    present: set[str] = set()
    for rel in walk_files(d):
        p = d / rel
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise CheckpointError(f"{where}/{rel}: a symlink leading outside the checkpoint directory", file=rel)
        if rel == MANIFEST:
            continue
        if rel not in files:
            raise CheckpointError(
                f"{where}/{rel}: not listed in the manifest (a checkpoint holds exactly the files of its manifest)",
                file=rel,
            )
        if p.is_file():
            present.add(rel)
    missing = set()
    for rel in sorted(files):
        if rel not in present:
            if part_of(rel) in parts:
                raise CheckpointError(f"{where}/{rel}: listed in the manifest but missing", file=rel)
            missing.add(part_of(rel))
    checked = parts & frozenset(part_of(rel) for rel in files)
    for rel in files_of(files, checked):
        if sha256_file(d / rel) != files[rel]:
            raise CheckpointError(f"{where}/{rel}: sha256 mismatch (file corrupt or modified)", file=rel)
    return VerifiedCheckpoint(d, files, checked, frozenset(missing), where)
