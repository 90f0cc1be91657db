"""Checkpoint URI -> what a deployment serves. Runs once per replica at start-up.

Fetching, caching and verification are `checkpoints.fetch_checkpoint`'s: a tier replica fetches what inference
needs (never optimizer.pt) and hashes each file once; the ingress fetches only config.json and tokenizer/.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from recursive_model.batching import ContinuousEngine
from recursive_model.config import GPTConfig
from recursive_model.engine import Engine
from recursive_model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from .config import TierConfig

logger = logging.getLogger(__name__)


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


def replica_engine(
    uri: str, cache_dir: str | os.PathLike[str] | None, tier: TierConfig
) -> tuple[LoadedModel, ContinuousEngine]:
    """What one replica of `tier` serves: the checkpoint on the tier's device (CUDA when the tier reserves GPUs), its
    one-token decode compiled when `tier.compile_decode`, behind one ContinuousEngine sized by the tier."""
    import torch

    device = "cuda" if tier.num_gpus > 0 else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"tier {tier.name}: num_gpus={tier.num_gpus} but torch sees no CUDA device in this replica")
    loaded = load_engine(uri, cache_dir, device=device)
    if tier.compile_decode:
        loaded.engine.model.compile_decode()  # graphs are built by the first steps that need them
    engine = ContinuousEngine(loaded.engine.model, loaded.tokenizer, **tier.engine_options(loaded.config.sequence_len))
    return loaded, engine


def tier_engine(uri: str, cache_dir: str | os.PathLike[str] | None, tier: TierConfig) -> ContinuousEngine:
    """`replica_engine`'s engine alone: a replica's `EngineSpec.factory` (run where the engine runs, maybe a child
    process), which warns when the tier recurs deeper than training did."""
    loaded, engine = replica_engine(uri, cache_dir, tier)
    if tier.r_max > loaded.config.recurrence.r_max:
        logger.warning(
            "tier %s: r_max=%d is deeper than training (recurrence.r_max=%d): extrapolated depth",
            tier.name,
            tier.r_max,
            loaded.config.recurrence.r_max,
        )
    return engine


def load_tokenizer_and_config(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> tuple[Tokenizer, GPTConfig]:
    """Tokenizer and model config of a checkpoint: what the ingress needs to validate and render prompts. Only
    those two parts are fetched and hashed."""
    ckpt = fetch_checkpoint(uri, INGRESS_PARTS, cache_dir=cache_dir)
    _require_tokenizer(ckpt, uri)
    return load_tokenizer(ckpt), load_config(ckpt)
