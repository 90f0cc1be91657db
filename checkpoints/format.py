"""Self-describing checkpoint directories: weights, config, tokenizer, loop/data state, optimizer, manifest.

    model.safetensors   weights (safetensors: no pickle)
    config.json         GPTConfig.to_dict()
    tokenizer/          Tokenizer.save()
    meta.json           free-form JSON: stage, step, data loader state, pipeline config, metrics
    optimizer.pt        optional; plain tensors/dicts, loaded with torch.load(weights_only=True)
    manifest.json       sha256 of every other file; written last, so a directory without one is incomplete

Nothing is read before the manifest vouched for it (manifest.py), and every failure to read a file, corrupt or
malformed, is a CheckpointError naming that file. Needs only torch, safetensors and tiktoken.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from recursive_model.config import GPTConfig
from recursive_model.model import GPT
from recursive_model.tokenizer import TOKENIZER_FILE, Tokenizer

from .errors import CheckpointError
from .layout import CONFIG, INFERENCE_PARTS, MANIFEST, META, OPTIMIZER, TOKENIZER_DIR, WEIGHTS
from .manifest import VerifiedCheckpoint, files_of, verify_checkpoint, write_manifest

_T = TypeVar("_T")
# What save_checkpoint may find in a directory it overwrites; anything else is someone's data and is not deleted.
_OWN_NAMES = {WEIGHTS, CONFIG, META, OPTIMIZER, TOKENIZER_DIR, MANIFEST, MANIFEST + ".tmp"}


@dataclass
class LoadedCheckpoint:
    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer | None  # None if the checkpoint has none
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    path: str = ""


def _clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Strip wrappers' prefixes (DDP "module.", torch.compile "_orig_mod.") so the file loads into a bare GPT.
    out = {}
    for k, v in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    config: GPTConfig,
    tokenizer: Tokenizer | None = None,
    meta: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory; the manifest of sha256 sums is written last.

    The files are written into a fresh sibling directory that then replaces `directory`, so re-saving never keeps
    (and certifies) a stale file of an earlier save, e.g. an optimizer.pt of a run that now saves none. An existing
    `directory` holding anything but checkpoint files is refused (FileExistsError), never deleted.
    """
    d = Path(directory)
    if d.is_dir():
        foreign = sorted(e.name for e in os.scandir(d) if e.name not in _OWN_NAMES)
        if foreign:
            raise FileExistsError(
                f"save_checkpoint: {d} exists and holds {foreign[0]!r}, which is not a checkpoint file; "
                f"refusing to replace it (allowed: {sorted(_OWN_NAMES)})"
            )
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=d.parent))
    try:
        save_file(_clean_state_dict(model), str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        (tmp / META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        write_manifest(tmp)
        if d.exists():
            (d / MANIFEST).unlink(missing_ok=True)  # readers see "incomplete" rather than a mix while it goes
            shutil.rmtree(d)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _as_verified(source: str | os.PathLike[str] | VerifiedCheckpoint, parts: frozenset[str]) -> VerifiedCheckpoint:
    return source if isinstance(source, VerifiedCheckpoint) else verify_checkpoint(source, parts)


def _read(ckpt: VerifiedCheckpoint, rel: str, what: str, read: Callable[[Path], _T]) -> _T:
    """`read(path)` of a verified file; any failure becomes a CheckpointError naming the file."""
    path = ckpt.file(rel)
    try:
        return read(path)
    except Exception as exc:  # malformed content of any kind: the file is at fault, whatever the parser raised
        message = f"{ckpt.source}/{rel}: cannot load {what} ({type(exc).__name__}: {exc})"
        raise CheckpointError(message, file=rel) from exc


def load_config(source: str | os.PathLike[str] | VerifiedCheckpoint) -> GPTConfig:
    """The GPTConfig of a checkpoint (a directory is verified for `config` only)."""
    ckpt = _as_verified(source, frozenset({"config"}))
    return _read(ckpt, CONFIG, "the model config", lambda p: GPTConfig.from_dict(json.loads(p.read_text())))


def load_tokenizer(source: str | os.PathLike[str] | VerifiedCheckpoint) -> Tokenizer | None:
    """The checkpoint's Tokenizer, or None when it has none."""
    ckpt = _as_verified(source, frozenset({"tokenizer"}))
    if not ckpt.has("tokenizer"):
        return None
    for rel in files_of(ckpt.files, ["tokenizer"]):
        ckpt.file(rel)  # all of tokenizer/ verified before Tokenizer.load opens any of it
    rel = f"{TOKENIZER_DIR}/{TOKENIZER_FILE}"
    return _read(ckpt, rel, "the tokenizer", lambda p: Tokenizer.load(p.parent))


def _read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _read_weights(config: GPTConfig) -> Callable[[Path], GPT]:
    def read(path: Path) -> GPT:
        model = GPT(config)
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        return model

    return read


def load_checkpoint(
    source: str | os.PathLike[str] | VerifiedCheckpoint,
    device: str | torch.device = "cpu",
    load_optimizer: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint: a directory (verified here, optimizer.pt too when `load_optimizer`) or the result of
    verify_checkpoint / fetch_checkpoint (verified already: nothing is hashed twice). Raises CheckpointError naming
    the file for anything missing, corrupt, unverified or malformed; a pickle payload in optimizer.pt included."""
    ckpt = _as_verified(source, INFERENCE_PARTS | ({"optimizer"} if load_optimizer else set()))
    config = load_config(ckpt)
    model = _read(ckpt, WEIGHTS, "the weights", _read_weights(config)).to(device)
    tokenizer = load_tokenizer(ckpt)
    meta = _read(ckpt, META, "meta", _read_meta) if ckpt.has("meta") else {}
    optimizer_state = None
    if load_optimizer and ckpt.has("optimizer"):
        # weights_only: plain tensors and containers; anything else (a pickled object) is refused by torch.
        optimizer_state = _read(
            ckpt, OPTIMIZER, "optimizer state", lambda p: torch.load(p, map_location="cpu", weights_only=True)
        )
    return LoadedCheckpoint(model, config, tokenizer, meta, optimizer_state, str(ckpt.path))
