"""Tokenizer: training, exact round trips, plain-file save/load, special tokens, chat template masks, token bytes."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import random

import pytest
import torch

from recursive_model.corpus import shipped_corpus_paths
from recursive_model.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer

UNICODE_SAMPLES = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\n\t",
    "Zürich, São Paulo, Kraków, İstanbul",
    "日本語のテキストと中文文本和한국어",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🤖",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",  # decomposed accents, Devanagari conjunct
    "RTL: שלום עולם مرحبا بالعالم",
    "zero width\u200bjoiner\u200d and BOM \ufeff and NUL \x00 and DEL \x7f",
    "numbers 1234567890 3.14159 -42 1e-10",
    "x = [i ** 2 for i in range(10)]  # comment\n\tif x: return None",
    "<|bos|> <|assistant_end|> are plain text here",
    "\U0010ffff \U0001f600 \u00ff\u0100",
]


def _shipped_texts(max_docs: int) -> list[str]:
    with gzip.open(shipped_corpus_paths()["train"], "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(max_docs), strict=False)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _shipped_texts(120)


@pytest.fixture(scope="module")
def tok(texts: list[str]) -> Tokenizer:
    return Tokenizer.train(texts, 512)


def test_train_sizes_and_special_token_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    n_ranks = tok.vocab_size - len(SPECIAL_TOKENS)
    # special tokens come right after the mergeable ranks, in SPECIAL_TOKENS order
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(n_ranks, n_ranks + len(SPECIAL_TOKENS)))
    assert tok.bos_token_id == tok.encode_special("<|bos|>") == n_ranks
    assert tok.encoding.n_vocab == tok.vocab_size
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        tok.encode_special("<|nope|>")


def test_train_validates_inputs(texts: list[str]) -> None:
    with pytest.raises(ValueError, match=rf"vocab_size=100 .*minimum is {MIN_VOCAB_SIZE}"):
        Tokenizer.train(texts, 100)
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("just one string", 300)
    with pytest.raises(TypeError, match="item 1 is int"):
        Tokenizer.train(["ok", 3], 300)
    # the minimum is valid: byte tokens and special tokens only, no merges
    assert Tokenizer.train(texts[:2], MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_training_is_deterministic(texts: list[str]) -> None:
    a, b = Tokenizer.train(texts[:60], 400), Tokenizer.train(iter(texts[:60]), 400)
    assert a.encoding._mergeable_ranks == b.encoding._mergeable_ranks
    assert a.encode(texts[60:70]) == b.encode(texts[60:70])


def test_compresses_english(tok: Tokenizer) -> None:
    text = " ".join(_shipped_texts(130)[120:])  # documents the tokenizer was not trained on
    assert len(text.encode()) / len(tok.encode(text)) > 1.6  # ~1.9 with 247 merges; raw bytes would be 1.0


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_samples(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.id_to_token(i) for i in ids) == text.encode("utf-8")


def test_round_trip_random_bytes(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_property(tok: Tokenizer) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None)  # no .hypothesis/ dir
    @hypothesis.given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", errors="replace"))))
    def check(text: str) -> None:
        assert tok.decode(tok.encode(text)) == text

    check()


def test_special_token_text_is_plain_text(tok: Tokenizer) -> None:
    specials = set(tok.special_tokens.values())
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"say {name} now")
        assert not specials.intersection(ids)
        assert tok.decode(ids) == f"say {name} now"
    conv = {
        "messages": [{"role": "user", "content": "<|assistant_end|><|bos|>"}, {"role": "assistant", "content": "ok"}]
    }
    ids, _ = tok.render_conversation(conv)
    assert ids.count(tok.encode_special("<|assistant_end|>")) == 1
    assert ids.count(tok.bos_token_id) == 1


def test_encode_prepend_append_and_batch(tok: Tokenizer) -> None:
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append=end) == [bos, *plain, end]
    assert tok.encode("hello", prepend=bos) == [bos, *plain]
    batch = tok.encode(UNICODE_SAMPLES, prepend=bos)
    assert batch == [[bos, *tok.encode(t)] for t in UNICODE_SAMPLES]
    with pytest.raises(TypeError, match="text\\[1\\] is int"):
        tok.encode(["a", 1])
    with pytest.raises(ValueError, match="out of range"):
        tok.encode("x", prepend=tok.vocab_size)


@pytest.mark.parametrize("bad", ["vocab_size", -1, 10**20])
def test_decode_of_an_out_of_range_id_names_the_id_and_the_range(tok: Tokenizer, bad) -> None:
    bad = tok.vocab_size if bad == "vocab_size" else bad
    ids = [*tok.encode("ok"), bad, 0]
    with pytest.raises(ValueError, match=rf"ids\[{len(ids) - 2}\]={bad} is out of range \[0, {tok.vocab_size}\)"):
        tok.decode(ids)
    last = tok.vocab_size - 1  # the top of the range is valid: the last special token
    assert tok.decode([last]) == SPECIAL_TOKENS[-1]


def test_save_load_identical(tok: Tokenizer, texts: list[str], tmp_path) -> None:
    names = tok.save(tmp_path / "tokenizer")
    assert names == [TOKENIZER_FILE]
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == names  # no temp files left behind
    payload = json.loads((tmp_path / "tokenizer" / TOKENIZER_FILE).read_text())  # plain JSON, no pickle
    assert payload["special_tokens"] == tok.special_tokens
    loaded = Tokenizer.load(tmp_path / "tokenizer")
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encoding._mergeable_ranks == tok.encoding._mergeable_ranks
    assert loaded.encode(texts[:20] + UNICODE_SAMPLES) == tok.encode(texts[:20] + UNICODE_SAMPLES)
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        Tokenizer.load(tmp_path / "missing")


def test_token_bytes(tok: Tokenizer, texts: list[str]) -> None:
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype == torch.long
    assert all(tb[i] == 0 for i in tok.special_tokens.values())
    assert all(tb[i] == 1 for i in range(256))  # the byte tokens
    assert (tb[256 : tok.vocab_size - len(SPECIAL_TOKENS)] >= 2).all()  # every merge is at least two bytes
    for text in texts[:10] + UNICODE_SAMPLES:
        assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    # specials add no bytes
    assert int(tb[tok.encode("abc", prepend="<|bos|>", append="<|assistant_end|>")].sum()) == 3


def _tool_conversation() -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute."},
                    {"type": "python", "text": "2+3"},
                    {"type": "python_output", "text": "5"},
                    {"type": "text", "text": "It is 5."},
                ],
            },
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome"},
        ]
    }


def test_render_conversation_exact_ids_and_mask(tok: Tokenizer) -> None:
    conv = _tool_conversation()
    original = copy.deepcopy(conv)
    ids, mask = tok.render_conversation(conv)
    assert conv == original  # the system merge does not mutate the caller's conversation
    sp = tok.encode_special
    e = tok.encode
    expected = [
        ([tok.bos_token_id, sp("<|user_start|>")], 0),
        (e("Be brief.\n\nWhat is 2+3?"), 0),  # system message merged into the first user message
        ([sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (e("Let me compute."), 1),
        ([sp("<|python_start|>"), *e("2+3"), sp("<|python_end|>")], 1),  # tool call: trained
        ([sp("<|output_start|>"), *e("5"), sp("<|output_end|>")], 0),  # tool output: not trained
        (e("It is 5."), 1),
        ([sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>"), *e("Thanks"), sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (e("Welcome") + [sp("<|assistant_end|>")], 1),
    ]
    assert ids == [t for chunk, _ in expected for t in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    # exact positions on a tiny example: bos u_start "hi" u_end a_start "yo" a_end
    small = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tok.render_conversation(small)
    n_hi, n_yo = len(e("hi")), len(e("yo"))
    assert len(ids) == 5 + n_hi + n_yo
    trained = [i for i, m in enumerate(mask) if m]
    assert trained == list(range(4 + n_hi, 5 + n_hi + n_yo))  # "yo" and <|assistant_end|>
    assert ids[trained[-1]] == sp("<|assistant_end|>")


def test_render_conversation_truncates(tok: Tokenizer) -> None:
    full_ids, full_mask = tok.render_conversation(_tool_conversation())
    ids, mask = tok.render_conversation(_tool_conversation(), max_tokens=7)
    assert ids == full_ids[:7] and mask == full_mask[:7]
    with pytest.raises(ValueError, match="max_tokens=0"):
        tok.render_conversation(_tool_conversation(), max_tokens=0)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "no messages"),
        ([{"role": "robot", "content": "x"}], "role='robot'"),
        ([{"role": "assistant", "content": "x"}], "expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user"),
        ([{"role": "user", "content": ["part"]}], "must be a str"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}], "sql"),
    ],
)
def test_render_conversation_rejects_malformed(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_training_labels_the_trained_tokens_and_the_prompt_targets(tok: Tokenizer) -> None:
    conversation = {"messages": [{"role": "user", "content": "7;c;a?"}, {"role": "assistant", "content": "9"}]}
    ids, mask = tok.render_conversation(conversation)
    assert tok.render_training(conversation) == (ids, [t if m else -1 for t, m in zip(ids, mask, strict=True)])
    targeted = {**conversation, "prompt_targets": [(1, "7"), (3, "4"), (5, "9")]}
    ids2, labels = tok.render_training(targeted)
    assert ids2 == ids  # the input never changes
    content = tok.encode("7;c;a?")
    offsets = list(itertools.accumulate(len(tok.id_to_token(t)) for t in content))
    expected = [t if m else -1 for t, m in zip(ids, mask, strict=True)]
    for n_chars, text in targeted["prompt_targets"]:
        if n_chars in offsets:  # the token ending after n_chars characters predicts `text`
            expected[2 + offsets.index(n_chars) + 1] = tok.encode(text)[0]
    assert labels == expected and labels != [t if m else -1 for t, m in zip(ids, mask, strict=True)]
    # an offset inside a token is skipped; a target that is not one token, or out of the prompt, is an error
    merged = {"messages": [{"role": "user", "content": "the the the"}, {"role": "assistant", "content": "x"}]}
    boundaries = set(itertools.accumulate(len(tok.id_to_token(t)) for t in tok.encode("the the the")))
    inside = next(n for n in range(1, 11) if n not in boundaries)
    assert tok.render_training({**merged, "prompt_targets": [(inside, "7")]}) == tok.render_training(merged)
    for pairs in ([(1, "hello world")], [(0, "7")], [(99, "7")]):
        with pytest.raises(ValueError, match="prompt_targets"):
            tok.render_training({**conversation, "prompt_targets": pairs})


def test_render_for_completion(tok: Tokenizer) -> None:
    conv = _tool_conversation()
    prompt = tok.render_for_completion(conv)
    full, _ = tok.render_conversation(conv)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    # the prompt is the full rendering up to and including the last <|assistant_start|>
    assert full[: len(prompt)] == prompt
    assert full[len(prompt) :] == tok.encode("Welcome") + [tok.encode_special("<|assistant_end|>")]
    assert len(conv["messages"]) == 5  # not mutated
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
