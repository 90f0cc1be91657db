"""Self-describing checkpoint directories: weights, config, tokenizer, loop/data state, optimizer, manifest.

The manifest (sha256 of every file) is written last, so a directory without one never counts as a checkpoint, and a
flipped byte anywhere is found before the weights are used. Nothing here unpickles: weights are safetensors and the
optional optimizer state loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .model import GPT

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
OPTIMIZER = "optimizer.pt"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or corrupt; the message names the file."""


@dataclass
class LoadedCheckpoint:
    model: GPT
    config: GPTConfig
    tokenizer: Any  # recursive_model.tokenizer.Tokenizer, or None if the checkpoint has none
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    path: str = ""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Strip wrappers' prefixes (DDP "module.", torch.compile "_orig_mod.") so the file loads into a bare GPT.
    out = {}
    for k, v in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    config: GPTConfig,
    tokenizer=None,
    meta: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory; the manifest of sha256 sums is written last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / MANIFEST).unlink(missing_ok=True)  # an overwritten directory is incomplete until the new manifest lands
    save_file(_clean_state_dict(model), str(d / WEIGHTS))
    (d / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    (d / META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        tokenizer.save(d / TOKENIZER_DIR)
    if optimizer_state is not None:
        torch.save(optimizer_state, d / OPTIMIZER)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT_VERSION, "files": {str(p.relative_to(d)): sha256_file(p) for p in files}}
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, d / MANIFEST)
    return d


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; raise CheckpointError naming the first bad or missing file."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: {MANIFEST} missing (checkpoint incomplete or not a checkpoint)")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{d / MANIFEST}: unreadable manifest ({exc})") from exc
    for rel in (WEIGHTS, CONFIG):
        if rel not in files:
            raise CheckpointError(f"{d}: manifest does not list {rel}")
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: sha256 mismatch (file corrupt or modified)")
    return manifest


def load_config(directory: str | os.PathLike) -> GPTConfig:
    return GPTConfig.from_dict(json.loads((Path(directory) / CONFIG).read_text()))


def load_checkpoint(
    directory: str | os.PathLike, device: str | torch.device = "cpu", load_optimizer: bool = False,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Verify and load a checkpoint directory written by save_checkpoint."""
    d = Path(directory)
    if verify:
        verify_checkpoint(d)
    config = load_config(d)
    model = GPT(config)
    try:
        model.load_state_dict(load_file(str(d / WEIGHTS), device="cpu"), strict=True)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{d / WEIGHTS}: cannot load weights ({exc})") from exc
    model.to(device)
    tokenizer = None
    if (d / TOKENIZER_DIR).is_dir():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(d / TOKENIZER_DIR)
    meta = json.loads((d / META).read_text()) if (d / META).is_file() else {}
    optimizer_state = None
    if load_optimizer and (d / OPTIMIZER).is_file():
        optimizer_state = torch.load(d / OPTIMIZER, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(model, config, tokenizer, meta, optimizer_state, str(d))
