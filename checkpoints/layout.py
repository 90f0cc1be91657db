"""The names inside a checkpoint directory and the parts a reader can ask for.

A part is a group of files that one consumer needs together: the serve ingress needs `config` and `tokenizer` only,
a model replica needs what inference needs, a resumed training run needs everything.
"""

from __future__ import annotations

from collections.abc import Iterable

MANIFEST = "manifest.json"  # {"files": {relpath: sha256}, "format": 1}; written last = the directory is complete
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
OPTIMIZER = "optimizer.pt"
TOKENIZER_DIR = "tokenizer"

REQUIRED = (WEIGHTS, CONFIG)  # a manifest without these does not describe a checkpoint
PARTS = ("config", "weights", "tokenizer", "meta", "optimizer", "other")
INGRESS_PARTS = frozenset({"config", "tokenizer"})  # validate and render prompts, no weights
INFERENCE_PARTS = frozenset({"config", "weights", "tokenizer", "meta"})  # a model replica: no optimizer state
ALL_PARTS = frozenset(PARTS)
_SINGLE_FILE_PARTS = {CONFIG: "config", WEIGHTS: "weights", META: "meta", OPTIMIZER: "optimizer"}


def part_of(rel: str) -> str:
    """The part a manifest path belongs to; files the format does not name are `other`."""
    if rel in _SINGLE_FILE_PARTS:
        return _SINGLE_FILE_PARTS[rel]
    return "tokenizer" if rel.startswith(TOKENIZER_DIR + "/") else "other"


def check_parts(parts: Iterable[str]) -> frozenset[str]:
    """`parts` as a frozenset; ValueError naming an unknown part and the known ones."""
    chosen = frozenset(parts)
    unknown = sorted(chosen - ALL_PARTS)
    if unknown:
        raise ValueError(f"parts: unknown part(s) {unknown}; known: {list(PARTS)}")
    return chosen
