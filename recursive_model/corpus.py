"""Text corpora: the shipped Python-docs corpus, local files, and hub datasets for real clusters.

The shipped corpus (`recursive_model/corpus/pydocs-{train,val}.jsonl.gz`, built by `scripts/build_corpus.py` from the
documentation inside the Python install) needs no download, so tests and the CPU demo are deterministic and offline.
Real runs name a hub dataset (e.g. FineWeb-Edu); that path goes through the same `datasets` calls but is never
exercised in tests because it needs the network.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).resolve().with_name("corpus")
SHIPPED_FILES = {"train": "pydocs-train.jsonl.gz", "val": "pydocs-val.jsonl.gz"}
SPLITS = ("train", "val")

# File suffix (compression suffix removed) -> `datasets` packaged builder.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".csv": "csv"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus lives: local files or a hub dataset, the text column, and how val is held out."""

    train: str  # local file / directory / glob, or a hub dataset name ("HuggingFaceFW/fineweb-edu")
    val: str | None = None  # separate val source; None = hold out the first `val_docs` documents of `train`
    config: str | None = None  # hub config name ("sample-10BT"); unused for local files
    text_field: str = "text"
    val_docs: int = 0  # documents held out from the start of `train` when `val` is None
    streaming: bool = False  # stream instead of materializing (needed for hub corpora larger than the disk)

    def __post_init__(self) -> None:
        if self.val is None and self.val_docs < 1:
            raise ValueError(f"CorpusSpec(train={self.train!r}): val_docs={self.val_docs} must be >= 1 when val=None")
        if self.val is not None and self.val_docs:
            raise ValueError(f"CorpusSpec(train={self.train!r}): set either val or val_docs, not both")


def shipped_corpus_paths() -> dict[str, Path]:
    """{"train": path, "val": path} of the shipped corpus; raises FileNotFoundError if package data is missing."""
    paths = {split: SHIPPED_DIR / name for split, name in SHIPPED_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"shipped corpus files missing: {missing}; install the package with its data or run scripts/build_corpus.py"
        )
    return paths


CORPUS_PRESETS: dict[str, CorpusSpec] = {
    # ~3.2 MB of English from the Python docs, committed to the repo; the CPU demo and tests use it.
    "shipped": CorpusSpec(train=str(SHIPPED_DIR / SHIPPED_FILES["train"]), val=str(SHIPPED_DIR / SHIPPED_FILES["val"])),
    # nanochat's pretraining data; streamed because the sample is tens of GB. Val = the first 10k documents.
    "fineweb-edu": CorpusSpec(train="HuggingFaceFW/fineweb-edu", config="sample-10BT", val_docs=10_000, streaming=True),
}


def resolve_corpus(source: str | CorpusSpec) -> CorpusSpec | None:
    """The CorpusSpec of a preset name (or the spec itself); None for a plain path or hub name."""
    if isinstance(source, CorpusSpec):
        return source
    return CORPUS_PRESETS.get(source)


def _is_local(source: str) -> bool:
    return os.path.exists(source) or bool(glob.has_magic(source) and glob.glob(source, recursive=True))


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for comp in _COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _BUILDERS.get(os.path.splitext(name)[1])


def _local_files(source: str, split: str) -> list[str]:
    """Data files of a local source: a file, a glob, or a directory (files named after `split` if there are any)."""
    if os.path.isdir(source):
        files = sorted(
            str(p)
            for p in Path(source).rglob("*")
            if p.is_file() and _builder_for(p.name) and not p.name.startswith(".")
        )
        # whole-word match, so "val" picks "pydocs-val.jsonl.gz" but not "interval.txt"
        named = [f for f in files if re.search(rf"(?<![a-z0-9]){re.escape(split)}(?![a-z0-9])", Path(f).name.lower())]
        if named:
            files = named
        elif split != "train":
            raise FileNotFoundError(f"directory {source!r} has no data file whose name contains split={split!r}")
    else:
        files = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
    if not files:
        raise FileNotFoundError(f"no data files (suffixes {sorted(_BUILDERS)}, optionally compressed) in {source!r}")
    return files


def load_text_dataset(
    source: str | CorpusSpec,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = False,
    config: str | None = None,
) -> Any:
    """A `datasets.Dataset` (or `IterableDataset` if streaming) of documents with a `text_field` column.

    `source` is a preset name from CORPUS_PRESETS, a CorpusSpec, a local file / directory / glob (json, jsonl,
    parquet, csv, txt; optionally .gz), or else a hub dataset name with optional `config`. `.txt` files give one
    document per blank-line-separated paragraph.
    """
    import datasets  # heavy import; only callers that read corpora pay for it

    spec = resolve_corpus(source)
    if spec is not None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} not in {SPLITS} for corpus {spec.train!r}")
        streaming = streaming or spec.streaming
        if spec.val is not None:
            return load_text_dataset(
                spec.train if split == "train" else spec.val, split, spec.text_field, streaming, spec.config
            )
        ds = load_text_dataset(spec.train, "train", spec.text_field, streaming, spec.config)
        if streaming:
            return ds.take(spec.val_docs) if split == "val" else ds.skip(spec.val_docs)
        held_out = min(spec.val_docs, len(ds))
        return ds.select(range(held_out)) if split == "val" else ds.select(range(held_out, len(ds)))

    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r} must be a preset name {sorted(CORPUS_PRESETS)}, a path or a dataset name")
    source = os.path.expanduser(source)
    if not _is_local(source) and (_builder_for(source) or source.startswith(("/", ".")) or glob.has_magic(source)):
        # looks like a path: fail here rather than with a network error from the hub lookup
        raise FileNotFoundError(f"local corpus source {source!r} does not exist (or the glob matches nothing)")
    if _is_local(source):
        files = _local_files(source, split)
        builders = {_builder_for(f) for f in files}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"local source {source!r} mixes or has unsupported file types: {sorted(map(str, builders))}"
            )
        builder = builders.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **kwargs)
    else:
        # Hub dataset: needs the network (real clusters only). `split` is the hub split name here.
        ds = datasets.load_dataset(source, name=config, split=split, streaming=streaming)
    columns = ds.column_names or []
    if columns and text_field not in columns:
        raise ValueError(f"text_field={text_field!r} is not a column of {source!r}; columns: {columns}")
    return ds


def iter_texts(
    source: str | CorpusSpec,
    split: str = "train",
    *,
    text_field: str = "text",
    rank: int = 0,
    world_size: int = 1,
    max_chars: int | None = None,
    max_doc_chars: int | None = None,
    streaming: bool = False,
) -> Iterator[str]:
    """Yield document texts, sharded by document (document i goes to rank i % world_size).

    `max_doc_chars` cuts each document (tokenizer training: one huge document should not dominate the pair counts);
    `max_chars` stops once that many characters were yielded in total (the last document is cut to fit).
    """
    _check_shard(rank, world_size)
    for name, value in (("max_chars", max_chars), ("max_doc_chars", max_doc_chars)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be None or >= 1")
    spec = resolve_corpus(source)
    field = spec.text_field if spec is not None else text_field
    ds = load_text_dataset(source, split, field, streaming)
    total = 0
    for row in itertools.islice(ds, rank, None, world_size):
        text = row[field]
        if not isinstance(text, str):
            raise TypeError(f"column {field!r} holds {type(text).__name__}, expected str")
        if max_doc_chars is not None:
            text = text[:max_doc_chars]
        if max_chars is not None:
            text = text[: max_chars - total]
        total += len(text)
        yield text
        if max_chars is not None and total >= max_chars:
            return


def _check_shard(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, {world_size})")
