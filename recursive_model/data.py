"""Packed, sharded, exactly resumable token loaders, and bits-per-byte evaluation.

Documents (texts, or conversations rendered with the chat template) are tokenized, concatenated into one stream per
rank (text documents start with <|bos|>, so BOS delimits them) and cut into batches: a window of B*T+1 stream tokens
gives inputs = window[:-1].view(B, T) and targets = window[1:].view(B, T), so row b is the (T+1)-token slice
[b*T, (b+1)*T] and every stream token is a target exactly once. The last token of a window is the first input of the
next one.

Ranks see disjoint documents: document at position p (in the epoch's order) belongs to rank p % world_size.

Resumption: the state is the position of the first stream token not yet consumed — (epoch, document position,
token offset inside that document). A resumed loader re-reads that document, drops `token_offset` tokens and carries
on, so it yields exactly the batches an uninterrupted loader would, without storing any tokens in the state.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

STATE_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T) and targets (B, T), int64


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value!r} must be an int {allowed}")


class _Documents:
    """A re-iterable document source read from a position, with document-level sharding and per-epoch shuffling.

    Accepts a sequence (len + integer indexing: list, datasets.Dataset, Task), a zero-argument callable returning a
    fresh iterable, or a re-iterable (an iterable whose iter() is not itself). One-shot iterators can be read once.
    """

    def __init__(self, documents: Any, shuffle_seed: int | None, one_pass_ok: bool):
        self.documents = documents
        self.is_sequence = hasattr(documents, "__len__") and hasattr(documents, "__getitem__")
        if isinstance(documents, str | bytes | dict):
            raise TypeError(f"documents must be a collection of documents, got a single {type(documents).__name__}")
        if not self.is_sequence and not callable(documents) and not isinstance(documents, Iterable):
            raise TypeError(f"documents must be a sequence, an iterable or a callable, got {type(documents).__name__}")
        if not self.is_sequence and shuffle_seed is not None:
            raise ValueError("shuffle_seed needs documents with len() and indexing (a list, a Dataset, a Task)")
        one_shot = not self.is_sequence and not callable(documents) and iter(documents) is documents
        if one_shot and not one_pass_ok:
            raise ValueError(
                "documents is a one-shot iterator, but an infinite loader re-reads it every epoch: "
                "pass a list, a Dataset, or a callable returning a fresh iterator"
            )
        self.shuffle_seed = shuffle_seed

    def read(self, epoch: int, start: int, rank: int, world_size: int) -> Iterator[tuple[int, Any]]:
        """(position, document) of this rank's documents at positions >= start, in the epoch's order."""
        first = start + (rank - start) % world_size  # smallest position >= start that belongs to this rank
        if self.is_sequence:
            n = len(self.documents)
            order = None
            if self.shuffle_seed is not None:
                # torch's seeded randperm is the same on every platform, so every rank agrees on the order
                gen = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=gen).tolist()
            for pos in range(first, n, world_size):
                yield pos, self.documents[order[pos] if order is not None else pos]
            return
        source = self.documents() if callable(self.documents) else self.documents
        yield from zip(
            itertools.count(first, world_size), itertools.islice(source, first, None, world_size), strict=False
        )


class _PackedLoader:
    """Shared packing, sharding, epochs and exact resumption; subclasses turn documents into (ids, labels)."""

    kind = "base"

    def __init__(
        self,
        documents: Any,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        shuffle_seed: int | None = None,
        device: str | torch.device = "cpu",
        docs_per_read: int = 64,
        state: dict | None = None,
    ):
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 1)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0, world_size - 1)
        _check_int("docs_per_read", docs_per_read, 1)
        if shuffle_seed is not None:
            _check_int("shuffle_seed", shuffle_seed, 0)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.infinite = infinite
        self.shuffle_seed = shuffle_seed
        self.device = torch.device(device)
        self.docs_per_read = docs_per_read
        self._documents = _Documents(documents, shuffle_seed, one_pass_ok=not infinite)
        self._seek(0, 0, 0)
        self.batches_yielded = 0
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ subclass hook

    def _encode(self, documents: list[Any]) -> list[tuple[list[int], list[int] | None]]:
        """Token ids and labels of each document: labels[t] is the target of the prediction after ids[:t] (-1: none;
        None = the ids themselves, every token is a target)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state

    def _seek(self, epoch: int, doc_index: int, token_offset: int) -> None:
        self._ids: list[int] = []
        self._labels: list[int] | None = None  # None while every buffered token is its own label
        # One [epoch, position, tokens of it still in the buffer, tokens of it already consumed] per buffered document.
        self._segments: deque[list[int]] = deque()
        self._skip = token_offset  # dropped from the first document read (resume inside a document)
        self._next_read = (epoch, doc_index)
        self._reader = self._read_documents(epoch, doc_index)
        self._exhausted = False

    def state_dict(self) -> dict:
        """JSON-able position of the next unconsumed token; `load_state_dict` of it resumes the exact batch stream."""
        if self._segments:
            epoch, doc_index, _, offset = self._segments[0]
        else:
            (epoch, doc_index), offset = self._next_read, self._skip
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "epoch": epoch,
            "doc_index": doc_index,
            "token_offset": offset,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_seed": self.shuffle_seed,
            "batches_yielded": self.batches_yielded,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; rank, world_size and shuffle_seed must match (they define the order)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version={state.get('version') if isinstance(state, dict) else state!r}, "
                f"expected {STATE_VERSION}"
            )
        for key in ("kind", "rank", "world_size", "shuffle_seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state {key}={state.get(key)!r} does not match this loader's {getattr(self, key)!r}"
                )
        for key in ("epoch", "doc_index", "token_offset", "batches_yielded"):
            _check_int(f"state[{key!r}]", state.get(key), 0)
        self._seek(state["epoch"], state["doc_index"], state["token_offset"])
        self.batches_yielded = state["batches_yielded"]

    # ------------------------------------------------------------------ stream

    def _read_documents(self, epoch: int, start: int) -> Iterator[tuple[int, int, Any]]:
        """(epoch, position, document) forever when infinite (epochs restart at position 0), else one pass."""
        while True:
            any_doc = start > 0  # resuming mid-epoch: earlier documents of this epoch did exist
            for pos, doc in self._documents.read(epoch, start, self.rank, self.world_size):
                any_doc = True
                yield epoch, pos, doc
            if not self.infinite:
                return
            if not any_doc:
                raise ValueError(
                    f"rank {self.rank} of world_size {self.world_size} has no documents: the source has fewer "
                    f"documents than ranks"
                )
            epoch, start = epoch + 1, 0

    def _fill(self, needed: int) -> bool:
        """Read and tokenize documents until the buffer holds `needed` tokens; False if the source ran out."""
        while len(self._ids) < needed:
            chunk = list(itertools.islice(self._reader, self.docs_per_read))
            if not chunk:
                return False
            for (epoch, pos, _), (ids, labels) in zip(chunk, self._encode([doc for _, _, doc in chunk]), strict=True):
                offset, self._skip = self._skip, 0
                ids = ids[offset:]
                if not ids:
                    raise ValueError(f"loader state token_offset={offset} is past the end of document {pos}")
                if labels is not None and self._labels is None:
                    self._labels = list(self._ids)
                if self._labels is not None:
                    self._labels.extend(labels[offset:] if labels is not None else ids)
                self._ids.extend(ids)
                self._segments.append([epoch, pos, len(ids), offset])
                self._next_read = (epoch, pos + self.world_size)
        return True

    def _consume(self, n: int) -> None:
        del self._ids[:n]
        if self._labels is not None:
            del self._labels[:n]
        while n:
            seg = self._segments[0]
            take = min(n, seg[2])
            seg[2] -= take
            seg[3] += take
            n -= take
            if seg[2] == 0:
                self._segments.popleft()

    def __iter__(self) -> _PackedLoader:
        return self

    def __next__(self) -> Batch:
        B, T = self.batch_size, self.seq_len
        if self._exhausted or not self._fill(B * T + 1):
            self._exhausted = True  # a finite loader drops the last partial batch
            raise StopIteration
        window = torch.tensor(self._ids[: B * T + 1], dtype=torch.long)
        inputs = window[:-1].view(B, T)
        if self._labels is None:
            targets = window[1:].view(B, T)
        else:  # -1 where nothing is learned (prompts), or an intermediate target instead of the next prompt token
            targets = torch.tensor(self._labels[1 : B * T + 1], dtype=torch.long).view(B, T)
        self._consume(B * T)  # keep the window's last token: it is the next window's first input
        self.batches_yielded += 1
        if self.device.type != "cpu":
            return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        return inputs, targets


class TokenLoader(_PackedLoader):
    """Packed pretraining batches from text documents, each tokenized with <|bos|> prepended.

    `documents`: a sequence of str (list, datasets column, ...), a re-iterable, or a callable returning a fresh
    iterable of str. Yields (inputs, targets) int64 (B, T); infinite over epochs unless `infinite=False`.
    """

    kind = "text"

    def __init__(self, documents: Any, tokenizer: Any, batch_size: int, seq_len: int, **kwargs: Any):
        self.tokenizer = tokenizer
        super().__init__(documents, batch_size, seq_len, **kwargs)

    def _encode(self, documents: list[Any]) -> list[tuple[list[int], list[int] | None]]:
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise TypeError(f"TokenLoader document {i} of a read is {type(doc).__name__}, expected str")
        return [(ids, None) for ids in self.tokenizer.encode(documents, prepend=self.tokenizer.bos_token_id)]


class ConversationLoader(_PackedLoader):
    """Packed mid-training / SFT batches: conversations rendered with the chat template (`Tokenizer.render_training`:
    targets -1 where not trained, a conversation's `prompt_targets` inside its prompt).

    `documents`: a sequence of conversation dicts (list, Task), a re-iterable or a callable. Each conversation starts
    with <|bos|> (render_conversation adds it) and is cut to `max_conversation_tokens`.
    """

    kind = "chat"

    def __init__(
        self,
        documents: Any,
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        *,
        max_conversation_tokens: int = 2048,
        **kwargs: Any,
    ):
        _check_int("max_conversation_tokens", max_conversation_tokens, 1)
        self.tokenizer = tokenizer
        self.max_conversation_tokens = max_conversation_tokens
        super().__init__(documents, batch_size, seq_len, **kwargs)

    def _encode(self, documents: list[Any]) -> list[tuple[list[int], list[int] | None]]:
        return [self.tokenizer.render_training(c, max_tokens=self.max_conversation_tokens) for c in documents]


def text_loader(
    source: Any,
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    split: str = "train",
    *,
    text_field: str = "text",
    streaming: bool = False,
    **kwargs: Any,
) -> TokenLoader:
    """A TokenLoader over a corpus (preset name, CorpusSpec, local path or hub name; see corpus.load_text_dataset)."""
    from .corpus import load_text_dataset, resolve_corpus

    spec = resolve_corpus(source)
    field = spec.text_field if spec is not None else text_field
    ds = load_text_dataset(source, split, field, streaming)
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        documents: Any = _Column(ds, field)
    else:
        documents = _streamed_column(ds, field)
    return TokenLoader(documents, tokenizer, batch_size, seq_len, **kwargs)


class _Column:
    """Lazy text column of a map-style dataset (indexing reads one row; the dataset stays on disk)."""

    def __init__(self, dataset: Any, field: str):
        self.dataset, self.field = dataset, field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        return self.dataset[index][self.field]


def _streamed_column(dataset: Any, field: str) -> Callable[[], Iterator[str]]:
    return lambda: (row[field] for row in dataset)


def bpb_totals(
    model: nn.Module, batches: Iterable[Batch], token_bytes: torch.Tensor, num_recur: int | None = None
) -> tuple[float, int]:
    """(sum of cross-entropy in nats, sum of target bytes) over `batches`; the summable parts of bits per byte.

    Only targets with token_bytes > 0 count: special tokens (0 bytes) and ignored targets (-1) are left out, so
    the measure does not depend on the vocabulary or on how documents are delimited. Ranks can all-reduce the pair.
    """
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64)
    total_bytes = torch.zeros((), dtype=torch.long)
    try:
        with torch.no_grad():
            for x, y in batches:
                loss = model(x, targets=y, num_recur=num_recur, loss_reduction="none").reshape(-1)
                y = y.reshape(-1)
                if loss.numel() != y.numel():
                    raise ValueError(f"model returned {loss.numel()} per-token losses for {y.numel()} targets")
                tb = token_bytes.to(y.device)
                nbytes = torch.where(y >= 0, tb[y.clamp(min=0)], torch.zeros_like(y))
                counted = nbytes > 0
                total_nats += loss.double()[counted].sum().cpu()
                total_bytes += nbytes.sum().cpu()
    finally:
        model.train(was_training)
    return float(total_nats), int(total_bytes)


def evaluate_bpb(
    model: nn.Module, batches: Iterable[Batch], token_bytes: torch.Tensor, num_recur: int | None = None
) -> float:
    """Bits per byte: summed per-token cross-entropy (nats) / (ln 2 * summed UTF-8 bytes of the target tokens)."""
    nats, nbytes = bpb_totals(model, batches, token_bytes, num_recur)
    if nbytes == 0:
        raise ValueError("evaluate_bpb: the batches hold no target tokens with bytes (empty or all special / -1)")
    return nats / (math.log(2) * nbytes)
