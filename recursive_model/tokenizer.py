"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, stored as plain JSON (no pickle).

Special tokens get the ids right after the mergeable ranks, in the order of `SPECIAL_TOKENS`. The chat template is
nanochat's: `<|bos|>` then alternating `<|user_start|>...<|user_end|>` / `<|assistant_start|>...<|assistant_end|>`
turns; assistant turns may contain python tool calls and their outputs.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken
import torch

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; also the document delimiter in packed pretraining rows
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant calls the python (calculator) tool
    "<|python_end|>",
    "<|output_start|>",  # tool output, inserted at run time, never trained on
    "<|output_end|>",
]

# GPT-4 split pattern with numbers split into groups of at most 2 digits instead of 3 (nanochat): with small
# vocabularies the 3-digit groups waste merges on rare numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)  # the 256 byte tokens and the special tokens, zero merges
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """tiktoken Encoding with the special tokens of the chat format and nanochat's conversation rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "rnc-bpe"):
        """Wrap mergeable ranks (bytes → rank, ranks 0..N-1 with the 256 single bytes first) and a split pattern."""
        _validate_ranks(mergeable_ranks)
        offset = len(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.vocab_size: int = self.encoding.n_vocab  # includes the special tokens
        self.bos_token_id: int = self.special_tokens["<|bos|>"]
        self._token_bytes: torch.Tensor | None = None

    # ------------------------------------------------------------------ training and files

    @classmethod
    def train(cls, text_iterator: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train byte-level BPE with rustbpe; `vocab_size` counts the 256 byte tokens, the merges and the specials.

        If the text has fewer distinct pairs than the requested merges, the result is smaller than `vocab_size`;
        `tokenizer.vocab_size` is always the true size.
        """
        import rustbpe  # imported here: loading a saved tokenizer needs only tiktoken

        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: the minimum is {MIN_VOCAB_SIZE} "
                f"({NUM_BYTE_TOKENS} byte tokens + {len(SPECIAL_TOKENS)} special tokens + number of merges)"
            )
        if isinstance(text_iterator, str):
            raise TypeError("text_iterator must be an iterable of strings, not a single str (wrap it in a list)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(_checked_texts(text_iterator), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        return cls(ranks, bpe.get_pattern())

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write `tokenizer.json` (pattern, special tokens, base64 mergeable ranks); returns names relative to it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = self.encoding._mergeable_ranks  # tiktoken keeps no public accessor for them
        payload = {
            "format": FORMAT_VERSION,
            "type": "tiktoken-bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            # ordered by rank, so the list index is the rank and the file needs no second copy of it
            "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in sorted(ranks.items(), key=_rank)],
        }
        tmp = directory / (TOKENIZER_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=0, ensure_ascii=True) + "\n", encoding="utf-8")
        tmp.replace(directory / TOKENIZER_FILE)  # atomic: a reader never sees half a file
        return [TOKENIZER_FILE]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer written by `save` from `directory`."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer directory {str(directory)!r}")
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: format={payload.get('format')!r}, this code reads format {FORMAT_VERSION}")
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(payload["mergeable_ranks"])}
        tokenizer = cls(ranks, payload["pattern"])
        if payload["special_tokens"] != tokenizer.special_tokens:
            raise ValueError(
                f"{path}: special_tokens={payload['special_tokens']} differ from {tokenizer.special_tokens}"
            )
        return tokenizer

    # ------------------------------------------------------------------ encoding

    def encode_special(self, name: str) -> int:
        """Id of a special token, e.g. "<|assistant_end|>"."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} out of range [0, {self.vocab_size})")
        return int(token)

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None
    ) -> list[int] | list[list[int]]:
        """Encode text (or a batch of texts) as ordinary text, optionally with a special token before / after.

        Special-token strings in the text (a user typing "<|bos|>") are encoded as plain text, never as the special
        token: only `prepend` / `append` and the chat renderer produce special ids.
        """
        pre = [] if prepend is None else [self._token_id(prepend)]
        post = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return pre + self.encoding.encode_ordinary(text) + post
        if isinstance(text, list | tuple):
            bad = [i for i, t in enumerate(text) if not isinstance(t, str)]
            if bad:
                raise TypeError(f"encode: text[{bad[0]}] is {type(text[bad[0]]).__name__}, expected str")
            return [pre + ids + post for ids in self.encoding.encode_ordinary_batch(list(text))]
        raise TypeError(f"encode: text must be str or list[str], got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text; special tokens appear as their names, invalid UTF-8 as U+FFFD.

        Raises ValueError naming the first id outside [0, vocab_size) (tiktoken would raise KeyError or OverflowError).
        """
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # min/max: one C-speed pass on the common path
            index, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise ValueError(f"decode: ids[{index}]={bad} is out of range [0, {self.vocab_size})")
        return self.encoding.decode(ids, errors="replace")

    def id_to_token(self, token_id: int) -> bytes:
        """The bytes of one token (special tokens: their name in UTF-8)."""
        return self.encoding.decode_single_token_bytes(self._token_id(token_id))

    def token_bytes(self) -> torch.Tensor:
        """int64 (vocab_size,): UTF-8 byte length of each token, 0 for special tokens (used for bits per byte)."""
        if self._token_bytes is None:
            special = set(self.special_tokens.values())
            lengths = [
                0 if i in special else len(self.encoding.decode_single_token_bytes(i)) for i in range(self.vocab_size)
            ]
            self._token_bytes = torch.tensor(lengths, dtype=torch.long)
        return self._token_bytes.clone()  # callers may move or modify it

    # ------------------------------------------------------------------ chat template

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask of a conversation (1 = trained on: assistant text, tool calls, assistant_end).

        A leading system message is merged into the first user message. Output is cut to `max_tokens`.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        messages = _chat_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self.special_tokens
        add(self.bos_token_id, 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)  # given at inference time (render_for_completion primes it)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                part_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(part_ids, 1)
                elif part["type"] == "python":
                    add([sp["<|python_start|>"], *part_ids, sp["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool at inference time, so not a prediction target
                    add([sp["<|output_start|>"], *part_ids, sp["<|output_end|>"]], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_training(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation for training: labels[t] is the token learned as the prediction after
        ids[:t] (ids[t] where `render_conversation`'s mask is 1), -1 where nothing is learned.

        `conversation["prompt_targets"]` (optional): (n_chars, text) pairs of intermediate targets inside the first user
        message. After its first n_chars characters the model learns to predict `text` (one token), e.g. a walk's
        digit after each move. The prompt's tokens stay as they are, so inference is unchanged: the targets only say
        what the states at those positions must already know. A pair whose offset falls inside a token (this tokenizer
        merged across it) is skipped.
        """
        ids, mask = self.render_conversation(conversation, max_tokens)
        labels = [t if m else -1 for t, m in zip(ids, mask, strict=True)]
        pairs = conversation.get("prompt_targets")
        if not pairs:
            return ids, labels
        first = conversation["messages"][0]
        if first["role"] != "user" or not isinstance(first["content"], str):
            raise ValueError("prompt_targets need a conversation that starts with a user message of text")
        content = first["content"]
        ends, offset = {}, 0  # byte offset in content where token j ends -> j
        for j, token in enumerate(self.encode(content)):
            offset += len(self.id_to_token(token))
            ends[offset] = j
        for n_chars, text in pairs:
            target = self.encode(text)
            if len(target) != 1 or not 0 < n_chars <= len(content):
                raise ValueError(f"prompt_targets entry ({n_chars!r}, {text!r}): needs 0 < n_chars <= "
                                 f"{len(content)} and a text of one token (it is {len(target)})")
            j = ends.get(len(content[:n_chars].encode("utf-8")))
            at = None if j is None else 3 + j  # after <|bos|> <|user_start|>: token j sits at 2 + j, predicts 3 + j
            if at is not None and at < len(labels):
                labels[at] = target[0]
        return ids, labels

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Ids of a conversation without its last (assistant) turn, followed by <|assistant_start|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion: the last message must be from the assistant (it is dropped)")
        trimmed = copy.deepcopy(conversation)
        trimmed["messages"] = trimmed["messages"][:-1]
        ids, _ = self.render_conversation(trimmed, max_tokens=sys.maxsize)  # no cut: the prompt is the input
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={self.vocab_size - MIN_VOCAB_SIZE})"


def _rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _validate_ranks(ranks: dict[bytes, int]) -> None:
    """Ranks must be exactly 0..N-1 and include the 256 single bytes, else ids and byte fallback break."""
    if len(ranks) < NUM_BYTE_TOKENS:
        raise ValueError(f"mergeable_ranks has {len(ranks)} entries, needs at least the {NUM_BYTE_TOKENS} byte tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("mergeable_ranks values must be exactly 0..N-1")
    missing = [b for b in range(NUM_BYTE_TOKENS) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"mergeable_ranks lacks single-byte tokens, e.g. {bytes([missing[0]])!r}")


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text_iterator item {i} is {type(text).__name__}, expected str")
        yield text


def _chat_messages(conversation: dict) -> list[dict]:
    """Validated messages with a leading system message merged into the first user message."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('conversation must be a dict {"messages": [...]}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role={m.get('role') if isinstance(m, dict) else m!r}; allowed {ROLES}")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        system, user = messages[0], messages[1]
        _require_str(system["content"], "messages[0].content (system)")
        _require_str(user["content"], "messages[1].content (user)")
        messages = [{"role": "user", "content": system["content"] + "\n\n" + user["content"]}, *messages[2:]]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"message {i} (after merging the system message) is from {m['role']!r}, expected "
                f"{expected!r}: turns must alternate user/assistant starting with user"
            )
        content = m["content"]
        if m["role"] == "user":
            _require_str(content, f"message {i} content (user)")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise ValueError(
                        f"message {i} part {j}: type={part.get('type') if isinstance(part, dict) else part!r}"
                        f"; allowed {PART_TYPES}"
                    )
                _require_str(part.get("text"), f"message {i} part {j} text")
        else:
            _require_str(content, f"message {i} content (assistant)")
    return messages


def _require_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a str, got {type(value).__name__}")
