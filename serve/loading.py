"""Checkpoint URI -> what a deployment serves. Runs once per replica at start-up.

Fetching, caching and verification are `checkpoints.fetch_checkpoint`'s: a tier replica fetches what inference
needs (never optimizer.pt) and hashes each file once; the ingress fetches only config.json and tokenizer/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoints import (
    INFERENCE_PARTS,
    INGRESS_PARTS,
    CheckpointError,
    VerifiedCheckpoint,
    fetch_checkpoint,
    load_checkpoint,
    load_config,
    load_tokenizer,
)
from recursive_model.config import GPTConfig
from recursive_model.engine import Engine
from recursive_model.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """An Engine ready to serve, and where it came from."""

    engine: Engine
    config: GPTConfig
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path


def _require_tokenizer(ckpt: VerifiedCheckpoint, uri: str) -> None:
    if not ckpt.has("tokenizer"):
        raise CheckpointError(f"{uri}: the checkpoint has no tokenizer/ directory; serving needs one")


def load_engine(uri: str, cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu") -> LoadedModel:
    """Fetch, verify and load a checkpoint into an eval-mode Engine."""
    ckpt = fetch_checkpoint(uri, INFERENCE_PARTS, cache_dir=cache_dir)
    _require_tokenizer(ckpt, uri)
    loaded = load_checkpoint(ckpt, device=device)
    loaded.model.eval()
    return LoadedModel(Engine(loaded.model, loaded.tokenizer), loaded.config, loaded.tokenizer, loaded.meta, ckpt.path)


def load_tokenizer_and_config(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Tokenizer, GPTConfig]:
    """Tokenizer and model config of a checkpoint: what the ingress needs to validate and render prompts. Only
    those two parts are fetched and hashed."""
    ckpt = fetch_checkpoint(uri, INGRESS_PARTS, cache_dir=cache_dir)
    _require_tokenizer(ckpt, uri)
    return load_tokenizer(ckpt), load_config(ckpt)
