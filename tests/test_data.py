"""Shipped corpus, local dataset loading, packed loaders (sharding, epochs, exact resume) and bits per byte."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from recursive_model.corpus import (
    CORPUS_PRESETS,
    CorpusSpec,
    iter_texts,
    load_text_dataset,
    shipped_corpus_paths,
)
from recursive_model.data import ConversationLoader, TokenLoader, bpb_totals, evaluate_bpb, text_loader
from recursive_model.tasks import Reasoning
from recursive_model.tokenizer import Tokenizer


def _read_jsonl_gz(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def val_texts() -> list[str]:
    return _read_jsonl_gz(shipped_corpus_paths()["val"])


@pytest.fixture(scope="module")
def tok(val_texts: list[str]) -> Tokenizer:
    return Tokenizer.train(val_texts, 320)


@pytest.fixture(scope="module")
def docs(val_texts: list[str]) -> list[str]:
    # short documents, so a few dozen batches cross several epoch boundaries
    return [t[: 16 + 4 * i] for i, t in enumerate(val_texts[:10])]


def _chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Computing."},
                    {"type": "python", "text": f"{i}+{i}"},
                    {"type": "python_output", "text": str(2 * i)},
                    {"type": "text", "text": f"The answer is {2 * i}."},
                ],
            },
        ]
    }


# ---------------------------------------------------------------------------------------------- corpus


def test_shipped_corpus_files() -> None:
    paths = shipped_corpus_paths()
    assert set(paths) == {"train", "val"}
    assert sum(p.stat().st_size for p in paths.values()) <= 3 * 1024 * 1024
    train, val = _read_jsonl_gz(paths["train"]), _read_jsonl_gz(paths["val"])
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.07  # ~5% of documents held out
    assert not set(train) & set(val)  # split by document, no document in both
    assert len(set(train)) == len(train)  # de-duplicated
    assert sum(map(len, train)) > 2_500_000 and all(isinstance(t, str) and t for t in train)
    assert CORPUS_PRESETS["shipped"].train == str(paths["train"])
    assert CORPUS_PRESETS["fineweb-edu"].streaming and CORPUS_PRESETS["fineweb-edu"].val_docs > 0


def test_load_text_dataset_local_formats(tmp_path, val_texts: list[str]) -> None:
    rows = [{"body": t, "n": i} for i, t in enumerate(val_texts[:5])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
        ds = load_text_dataset(str(tmp_path / name), text_field="body")
        assert [r["body"] for r in ds] == val_texts[:5], name
    streamed = load_text_dataset(str(tmp_path / "d.jsonl.gz"), text_field="body", streaming=True)
    assert [r["body"] for r in streamed] == val_texts[:5]
    (tmp_path / "notes.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert list(iter_texts(str(tmp_path / "notes.txt"))) == ["first paragraph", "second paragraph\n"]
    with pytest.raises(ValueError, match="text_field='text' is not a column.*body"):
        load_text_dataset(str(tmp_path / "d.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))  # a path, so no hub lookup


def test_load_text_dataset_directory_by_split(tmp_path) -> None:
    for split, texts in (("train", ["a", "b", "c"]), ("val", ["v"])):
        (tmp_path / f"part-{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert list(iter_texts(str(tmp_path), "train")) == ["a", "b", "c"]
    assert list(iter_texts(str(tmp_path), "val")) == ["v"]
    with pytest.raises(FileNotFoundError, match="split='test'"):
        load_text_dataset(str(tmp_path), "test")


def test_presets_hold_out_val_docs(tmp_path) -> None:
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    spec = CorpusSpec(train=str(tmp_path / "all.jsonl"), val_docs=3)
    for streaming in (False, True):
        assert list(iter_texts(spec, "val", streaming=streaming)) == ["doc 0", "doc 1", "doc 2"]
        assert list(iter_texts(spec, "train", streaming=streaming)) == [f"doc {i}" for i in range(3, 10)]
    with pytest.raises(ValueError, match="val_docs=0"):
        CorpusSpec(train="x")


def test_iter_texts_shards_and_limits(val_texts: list[str]) -> None:
    shards = [list(iter_texts("shipped", "val", rank=r, world_size=3)) for r in range(3)]
    assert shards[1] == val_texts[1::3]
    assert sorted(sum(shards, [])) == sorted(val_texts)  # disjoint and complete
    capped = list(iter_texts("shipped", "val", max_chars=10_000, max_doc_chars=500))
    assert sum(map(len, capped)) == 10_000 and max(map(len, capped)) <= 500
    assert capped[0] == val_texts[0][:500]
    with pytest.raises(ValueError, match="rank=3"):
        list(iter_texts("shipped", "val", rank=3, world_size=3))


# ---------------------------------------------------------------------------------------------- packing


def _stream(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The token stream a sequence of batches covers: each window's inputs, plus the final target."""
    out: list[int] = []
    for x, _ in batches:
        out.extend(x.reshape(-1).tolist())
    out.append(int(batches[-1][1].reshape(-1)[-1]))
    return out


def test_token_loader_packs_bos_delimited_documents(tok: Tokenizer, docs: list[str]) -> None:
    B, T = 2, 8
    loader = TokenLoader(docs, tok, B, T, infinite=False)
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    for x, y in batches:
        flat_x, flat_y = x.reshape(-1), y.reshape(-1)
        assert torch.equal(flat_x[1:], flat_y[:-1])  # targets are the inputs shifted by one, across rows too
    expected = [t for d in docs for t in tok.encode(d, prepend="<|bos|>")]
    n = len(batches)
    assert n == (len(expected) - 1) // (B * T)  # the last partial batch is dropped
    assert _stream(batches) == expected[: n * B * T + 1]


def test_ranks_see_disjoint_documents(tok: Tokenizer, docs: list[str]) -> None:
    for rank in range(2):
        batches = list(TokenLoader(docs, tok, 1, 4, rank=rank, world_size=2, infinite=False))
        expected = [t for d in docs[rank::2] for t in tok.encode(d, prepend="<|bos|>")]
        assert _stream(batches) == expected[: len(batches) * 4 + 1]


def _check_resume(make, n: int, ks: list[int]) -> None:
    """Batches k..n of a loader resumed from the state after k equal those of an uninterrupted loader."""
    loader = make(None)
    reference, states = [], []
    for _ in range(n):
        states.append(json.loads(json.dumps(loader.state_dict())))  # the state must survive JSON
        reference.append(next(loader))
    for k in ks:
        resumed = make(states[k])
        for i in range(k, n):
            x, y = next(resumed)
            assert torch.equal(x, reference[i][0]) and torch.equal(y, reference[i][1]), (k, i)


@pytest.mark.parametrize(
    "kwargs", [{}, {"shuffle_seed": 3}, {"rank": 1, "world_size": 2}, {"rank": 0, "world_size": 3, "shuffle_seed": 0}]
)
def test_token_loader_resumes_exactly(tok: Tokenizer, docs: list[str], kwargs: dict) -> None:
    def make(state):
        return TokenLoader(docs, tok, 2, 6, docs_per_read=3, state=state, **kwargs)

    _check_resume(make, n=60, ks=[0, 1, 7, 23, 41, 59])
    loader = make(None)
    for _ in range(60):
        next(loader)
    assert loader.state_dict()["epoch"] >= 2  # the test crossed epoch boundaries
    assert loader.state_dict()["batches_yielded"] == 60


def test_token_loader_resumes_from_callable_source(tok: Tokenizer, docs: list[str]) -> None:
    def make(state):
        return TokenLoader(lambda: iter(docs), tok, 1, 16, rank=1, world_size=2, state=state)

    _check_resume(make, n=25, ks=[3, 11, 24])


def test_shuffle_changes_order_per_epoch(tok: Tokenizer, docs: list[str]) -> None:
    plain = _stream(list(TokenLoader(docs, tok, 1, 8, infinite=False)))
    shuffled = _stream(list(TokenLoader(docs, tok, 1, 8, infinite=False, shuffle_seed=1)))
    assert plain != shuffled and len(plain) == len(shuffled)
    again = _stream(list(TokenLoader(docs, tok, 1, 8, infinite=False, shuffle_seed=1)))
    assert shuffled == again


def test_loader_validation(tok: Tokenizer, docs: list[str]) -> None:
    with pytest.raises(ValueError, match="rank=2"):
        TokenLoader(docs, tok, 1, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len=0"):
        TokenLoader(docs, tok, 1, 0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        TokenLoader((d for d in docs), tok, 1, 8)
    assert len(list(TokenLoader((d for d in docs), tok, 1, 8, infinite=False))) > 0  # one pass is fine
    with pytest.raises(ValueError, match="fewer documents than ranks"):
        next(TokenLoader(docs[:1], tok, 1, 8, rank=1, world_size=2))
    state = TokenLoader(docs, tok, 1, 8, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 does not match"):
        TokenLoader(docs, tok, 1, 8, state=state)
    with pytest.raises(ValueError, match="kind='text'"):
        ConversationLoader([_chat(1)], tok, 1, 8, world_size=2, state=state)


def test_conversation_loader_masks_and_resumes(tok: Tokenizer) -> None:
    convs = [_chat(i) for i in range(7)]
    B, T = 2, 8
    batches = list(ConversationLoader(convs, tok, B, T, infinite=False))
    ids = [t for c in convs for t in tok.render_conversation(c)[0]]
    mask = [m for c in convs for m in tok.render_conversation(c)[1]]
    n = len(batches)
    assert n == (len(ids) - 1) // (B * T)
    expected_y = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert [t for _, y in batches for t in y.reshape(-1).tolist()] == expected_y[: n * B * T]
    assert [t for x, _ in batches for t in x.reshape(-1).tolist()] == ids[: n * B * T]
    assert any(t == -1 for _, y in batches for t in y.reshape(-1).tolist())

    def make(state):
        return ConversationLoader(convs, tok, B, T, docs_per_read=2, shuffle_seed=5, state=state)

    _check_resume(make, n=30, ks=[0, 5, 13, 29])


def test_conversation_loader_targets_are_the_rendered_labels_shifted(tok: Tokenizer) -> None:
    """Intermediate targets (a walk's digit after each move) land where Tokenizer.render_training puts them; mixed
    with text-free conversations and resumed, the stream is the same."""
    convs = list(Reasoning("walk", size=9, state_targets=True)) + [_chat(i) for i in range(3)]
    B, T = 2, 8
    batches = list(ConversationLoader(convs, tok, B, T, infinite=False))
    ids = [t for c in convs for t in tok.render_training(c)[0]]
    labels = [t for c in convs for t in tok.render_training(c)[1]]
    n = len(batches)
    assert [t for _, y in batches for t in y.reshape(-1).tolist()] == labels[1: n * B * T + 1]
    assert [t for x, _ in batches for t in x.reshape(-1).tolist()] == ids[: n * B * T]
    digits = {tok.encode(str(d))[0] for d in range(10)}
    user_start = tok.encode_special("<|user_start|>")
    # some prompt positions (inside a user turn) now have digit targets
    inside_prompt = [y for x, y in zip(ids, labels[1:], strict=False) if x not in (user_start,) and y in digits]
    assert len(inside_prompt) > len(convs)

    def make(state):
        return ConversationLoader(convs, tok, B, T, docs_per_read=2, shuffle_seed=5, state=state)

    _check_resume(make, n=20, ks=[0, 7, 19])


def test_text_loader_from_shipped_corpus(tok: Tokenizer, val_texts: list[str]) -> None:
    loader = text_loader("shipped", tok, 4, 32, "val", infinite=False, rank=1, world_size=2)
    x, y = next(loader)
    expected = [t for d in val_texts[1:3:2] for t in tok.encode(d, prepend="<|bos|>")]
    assert x.reshape(-1).tolist() == expected[: 4 * 32]
    assert x[0, 0] == tok.bos_token_id


# ---------------------------------------------------------------------------------------------- bits per byte


class UniformModel(nn.Module):
    """Same call signature as GPT; logits are all equal, so every target costs exactly ln(V) nats."""

    def __init__(self, vocab_size: int, per_token_shape: str = "flat"):
        super().__init__()
        self.vocab_size = vocab_size
        self.per_token_shape = per_token_shape
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.seen_num_recur: list[int | None] = []
        self.seen_training: list[bool] = []

    def forward(self, idx, targets=None, num_recur=None, loss_reduction="mean"):
        self.seen_num_recur.append(num_recur)
        self.seen_training.append(self.training)
        logits = self.bias.expand(*idx.shape, self.vocab_size)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.reshape(-1, self.vocab_size), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(targets.shape) if self.per_token_shape == "2d" and loss_reduction == "none" else loss


@pytest.mark.parametrize("shape", ["flat", "2d"])
def test_evaluate_bpb_uniform_model(tok: Tokenizer, docs: list[str], shape: str) -> None:
    batches = list(TokenLoader(docs, tok, 2, 16, infinite=False))
    token_bytes = tok.token_bytes()
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    counted = token_bytes[targets] > 0  # BOS targets carry no bytes and are left out
    assert 0 < int((~counted).sum()) < len(targets)
    expected = int(counted.sum()) * math.log(tok.vocab_size) / (math.log(2) * int(token_bytes[targets].sum()))
    model = UniformModel(tok.vocab_size, shape)
    model.train()
    bpb = evaluate_bpb(model, batches, token_bytes, num_recur=3)
    assert bpb == pytest.approx(expected, rel=1e-6)  # the model's losses are float32
    assert model.seen_num_recur == [3] * len(batches) and not any(model.seen_training)
    assert model.training  # restored


def test_evaluate_bpb_ignores_masked_targets(tok: Tokenizer) -> None:
    x = torch.tensor([[10, 11, 12, 13]])
    y = torch.tensor([[11, -1, 13, tok.bos_token_id]])
    token_bytes = tok.token_bytes()
    nats, nbytes = bpb_totals(UniformModel(tok.vocab_size), [(x, y)], token_bytes)
    assert nbytes == int(token_bytes[11] + token_bytes[13])
    assert nats == pytest.approx(2 * math.log(tok.vocab_size))
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_bpb(UniformModel(tok.vocab_size), [(x, torch.full_like(y, -1))], token_bytes)
