"""Build the shipped English corpus from documentation that every Python install carries.

Sources, none downloaded:
  1. `pydoc_data.topics.topics`: the language-reference topics that `help()` shows (~465 KB).
  2. Docstrings of the standard library's .py files (modules, classes, functions), read with `ast` so no module is
     imported and no import-time side effect can run (antigravity, turtle, tkinter...). Test suites are skipped.
  3. Multi-line comment blocks of the same files (the "why" notes of CPython's authors are English prose).
  4. Docstrings of the compiled stdlib modules (builtins, math, itertools, _io, ...), which live in the binary and
     are read with `inspect` after importing these side-effect-free extension modules.
  5. The few prose text files shipped in the stdlib directory (IDLE help and news, LICENSE, email architecture).

Docstrings are de-duplicated across the corpus (inherited and copied docstrings appear many times), grouped into
documents (a module body, a class, a module's comments, a topic, a text file), de-duplicated again by document, and
split by document into train / val with a fixed seed. The output is committed to the repo, so every run of the
project sees the same corpus; re-running this script on another Python version gives a slightly different one.

    python scripts/build_corpus.py [--out recursive_model/corpus] [--val-fraction 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import hashlib
import html.parser
import importlib
import inspect
import io
import json
import random
import re
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

# Compiled modules that are test fixtures, or that touch the terminal / a GUI toolkit when imported.
C_MODULE_DENYLIST = ("_test", "xx", "_xx", "_ctypes_test", "_tkinter", "readline", "_curses", "_curses_panel")
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
TEXT_FILES = [  # prose files of the stdlib directory, relative to it; missing ones are skipped
    "LICENSE.txt",
    "email/architecture.rst",
    "idlelib/help.html",
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/README.txt",
    "idlelib/HISTORY.txt",
    "idlelib/TODO.txt",
    "idlelib/CREDITS.txt",
    "idlelib/extend.txt",
]
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") are boilerplate, not prose
MIN_DOCUMENT_CHARS = 200  # smaller classes stay inside their module's document
MIN_COMMENT_BLOCK_LINES = 3  # one-line comments are mostly "# XXX" or code labels
MIN_COMMENT_BLOCK_CHARS = 150


def _normalize(text: str) -> str:
    """Whitespace-insensitive key used to de-duplicate docstrings and documents."""
    return re.sub(r"\s+", " ", text).strip()


class _Deduper:
    """Keeps the first occurrence of each docstring across the whole corpus."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def take(self, doc: object) -> str | None:
        if not isinstance(doc, str):
            return None
        doc = inspect.cleandoc(doc)
        key = _normalize(doc)
        if len(key) < MIN_DOC_CHARS or key in self.seen:
            return None
        self.seen.add(key)
        return doc


def stdlib_root() -> Path:
    """The directory holding the pure-Python standard library of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path) -> list[tuple[str, Path]]:
    """Sorted (dotted module name, path) of the stdlib's .py files, test suites excluded."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if TEST_DIRS.intersection(rel.parts) or rel.name.startswith("test_"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return sorted(out)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"({ast.unparse(node.args)})"


def python_module_documents(name: str, tree: ast.Module, dedup: _Deduper) -> list[tuple[str, str]]:
    """(doc_id, text) pairs from one parsed module: its docstring and functions, plus one document per big class."""
    body: list[str] = []
    docs: list[tuple[str, str]] = []
    if (text := dedup.take(ast.get_docstring(tree, clean=False))) is not None:
        body.append(f"Module {name}\n\n{text}")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            if (text := dedup.take(ast.get_docstring(node, clean=False))) is not None:
                body.append(f"{name}.{node.name}{_signature(node)}\n\n{text}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            parts: list[str] = []
            if (text := dedup.take(ast.get_docstring(node, clean=False))) is not None:
                bases = ", ".join(ast.unparse(b) for b in node.bases)
                parts.append(f"class {name}.{node.name}{f'({bases})' if bases else ''}\n\n{text}")
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    not member.name.startswith("_") or member.name == "__init__"
                ):
                    if (text := dedup.take(ast.get_docstring(member, clean=False))) is not None:
                        parts.append(f"{node.name}.{member.name}{_signature(member)}\n\n{text}")
            doc = "\n\n".join(parts)
            if len(doc) >= MIN_DOCUMENT_CHARS:
                docs.append((f"py:{name}.{node.name}", doc))
            elif doc:
                body.append(doc)
    if body:
        docs.insert(0, (f"py:{name}", "\n\n".join(body)))
    return docs


def comment_blocks(source: str) -> list[str]:
    """Runs of consecutive full-line comments, '#' stripped, long enough to be prose."""
    blocks: list[list[str]] = []
    last_line = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
            continue
        text = tok.string.lstrip("#").strip()
        if tok.start[0] == last_line + 1 and blocks:
            blocks[-1].append(text)
        else:
            blocks.append([text])
        last_line = tok.start[0]
    out = []
    for lines in blocks:
        text = "\n".join(lines).strip()
        # Skip shebangs, license headers and commented-out code (lines ending in ':' or containing '(' + ')').
        code_like = sum(1 for ln in lines if ln.endswith(":") or re.search(r"\w\(.*\)$", ln) or "=" in ln)
        if (
            len(lines) >= MIN_COMMENT_BLOCK_LINES
            and len(text) >= MIN_COMMENT_BLOCK_CHARS
            and code_like * 3 < len(lines)
        ):
            out.append(text)
    return out


def python_documents(root: Path, dedup: _Deduper) -> Iterator[tuple[str, str]]:
    """Docstring and comment documents of every stdlib .py file (parsed, never imported)."""
    for name, path in stdlib_sources(root):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source)
            blocks = comment_blocks(source)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue  # lib2to3 fixtures and other Python-2 files
        yield from python_module_documents(name, tree, dedup)
        kept = [b for b in blocks if dedup.take(b) is not None]
        if kept and sum(map(len, kept)) >= MIN_DOCUMENT_CHARS:
            yield f"comments:{name}", f"Notes from the source of {name}\n\n" + "\n\n".join(kept)


def compiled_module_names(root: Path) -> list[str]:
    """Names of the compiled stdlib modules (built in, or .so files in lib-dynload), minus the denylist."""
    names = set(sys.builtin_module_names)
    names.update(p.name.split(".")[0] for p in (root / "lib-dynload").glob("*.so"))
    return sorted(n for n in names if not n.startswith(C_MODULE_DENYLIST))


def compiled_documents(root: Path, dedup: _Deduper) -> Iterator[tuple[str, str]]:
    """Docstring documents of compiled stdlib modules, read with inspect after a quiet import."""
    for name in compiled_module_names(root):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue  # not built on this platform
        public = name.lstrip("_")
        body: list[str] = []
        if (text := dedup.take(module.__doc__)) is not None:
            body.append(f"Module {public}\n\n{text}")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            parts: list[str] = []
            if (text := dedup.take(obj.__doc__)) is not None:
                parts.append(f"{'class ' if inspect.isclass(obj) else ''}{public}.{attr}\n\n{text}")
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if not mname.startswith("_") and (text := dedup.take(getattr(member, "__doc__", None))):
                        parts.append(f"{attr}.{mname}\n\n{text}")
            doc = "\n\n".join(parts)
            if inspect.isclass(obj) and len(doc) >= MIN_DOCUMENT_CHARS:
                yield f"c:{public}.{attr}", doc
            elif doc:
                body.append(doc)
        if body:
            yield f"c:{public}", "\n\n".join(body)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, paragraphs separated by blank lines."""

    BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "tr", "section", "br"}

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.chunks.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.chunks.append(data)

    def text(self) -> str:
        raw = "".join(self.chunks)
        paragraphs = [re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", raw)]
        return "\n\n".join(p for p in paragraphs if p)


def text_file_documents(root: Path) -> Iterator[tuple[str, str]]:
    """The stdlib directory's prose files, HTML reduced to its text."""
    for rel in TEXT_FILES:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".html":
            parser = _HTMLText()
            parser.feed(text)
            text = parser.text()
        yield f"file:{rel}", text


def collect_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """All (doc_id, text) pairs, de-duplicated by id and by whitespace-normalized text, sorted by doc_id."""
    from pydoc_data.topics import topics

    root = root or stdlib_root()
    docs: dict[str, str] = {}
    seen_text: set[str] = set()

    def add(doc_id: str, text: str) -> None:
        key = hashlib.sha256(_normalize(text).encode()).hexdigest()
        if key not in seen_text and doc_id not in docs and text.strip():
            seen_text.add(key)
            docs[doc_id] = text.strip() + "\n"

    for topic in sorted(topics):
        add(f"topic:{topic}", topics[topic])
    dedup = _Deduper()
    for source in (python_documents(root, dedup), compiled_documents(root, dedup), text_file_documents(root)):
        for doc_id, text in source:
            add(doc_id, text)
    return sorted(docs.items())


def split_documents(docs: list[tuple[str, str]], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded shuffle of the documents, then the first `val_fraction` of them are held out as val.

    The shuffled order is also the order written, so a loader that streams the train file sequentially does not see
    one package at a time.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    order = list(docs)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return {"val": [t for _, t in order[:n_val]], "train": [t for _, t in order[n_val:]]}


def write_jsonl_gz(path: Path, texts: list[str]) -> int:
    """Write `{"text": ...}` lines, gzip'd with mtime=0 so the bytes are reproducible; returns the file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> dict:
    """Build the corpus and print a JSON summary (documents, chars, UTF-8 bytes, compressed bytes per split)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "recursive_model" / "corpus")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    docs = collect_documents()
    splits = split_documents(docs, args.val_fraction, args.seed)
    summary: dict = {"python": sys.version.split()[0], "seed": args.seed, "splits": {}}
    for split in ("train", "val"):
        texts = splits[split]
        size = write_jsonl_gz(args.out / f"pydocs-{split}.jsonl.gz", texts)
        summary["splits"][split] = {
            "documents": len(texts),
            "chars": sum(len(t) for t in texts),
            "utf8_bytes": sum(len(t.encode("utf-8")) for t in texts),
            "gzip_bytes": size,
        }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
