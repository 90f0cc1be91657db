"""Tasks read from the public hub data sets, by hub name (via `datasets.load_dataset`) or from a local file.

Field names are exactly those on the hub:
  allenai/ai2_arc          question, choices {text, label}, answerKey            (configs ARC-Easy, ARC-Challenge)
  cais/mmlu                question, subject, choices, answer (int)              (configs all, auxiliary_train, ...)
  openai/gsm8k             question, answer ("... <<a*b=c>> ... #### N")         (config main)
  openai/openai_humaneval  task_id, prompt, canonical_solution, test, entry_point
  HuggingFaceTB/smoltalk   messages [{role, content}]                            (config all)
A local `source` (a .jsonl/.json/.parquet file, or a directory in hub layout) is read without any network.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from recursive_model.tasks.base import (
    Conversation,
    EvalType,
    Task,
    check_choice,
    extract_final_answer,
    last_text,
    render_mc,
    strip_special,
)
from recursive_model.tasks.execution import execute_program

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
Rows = Sequence[dict[str, Any]]


def is_local(source: str) -> bool:
    """A source is local when it exists on disk or looks like a file name; otherwise it is a hub name."""
    return os.path.exists(source) or source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def _read_file(path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only needed for parquet sources

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_rows(source: str, subset: str | None = None, split: str = "test") -> Rows:
    """Rows of a data set: a local file read directly, else `datasets.load_dataset(source, subset, split=split)`.

    A local file holds one split of one subset already, so `subset` and `split` only apply to hub names and to
    directories (a local copy of a hub repository, which `datasets` reads offline).
    """
    source = os.path.expanduser(source)
    if is_local(source) and not os.path.isdir(source):
        if not os.path.exists(source):
            raise FileNotFoundError(f"task source {source!r} does not exist (expected a {'/'.join(LOCAL_SUFFIXES)})")
        if not source.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"task source {source!r} must end in one of {list(LOCAL_SUFFIXES)}")
        return _read_file(source)
    from datasets import load_dataset  # heavy import, only for hub names and hub-layout directories

    return load_dataset(source, subset, split=split)


class _RowsTask(Task):
    """A task over loaded rows; subclasses turn one row into a conversation."""

    def __init__(self, source: str, subset: str | None, split: str, **slicing: Any) -> None:
        super().__init__(**slicing)
        self.source, self.subset, self.split = source, subset, split
        self.rows = load_rows(source, subset, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def _field(self, row: dict[str, Any], key: str, index: int) -> Any:
        if key not in row:
            raise KeyError(f"{self.name} row {index} of {self.source!r} has no field {key!r} (fields: {list(row)})")
        return row[key]


class ARC(_RowsTask):
    """AI2 ARC multiple choice (Easy or Challenge); the answer is one letter."""

    letters = ("A", "B", "C", "D")
    SUBSETS = ("ARC-Easy", "ARC-Challenge")

    def __init__(
        self, subset: str = "ARC-Easy", split: str = "test", source: str = "allenai/ai2_arc", **slicing: Any
    ) -> None:
        check_choice("ARC.subset", subset, self.SUBSETS)
        check_choice("ARC.split", split, ("train", "validation", "test"))
        super().__init__(source, subset, split, **slicing)

    @property
    def name(self) -> str:
        return self.subset

    @property
    def eval_type(self) -> EvalType:
        return "categorical"

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        choices = self._field(row, "choices", index)
        letters, answer = list(choices["label"]), self._field(row, "answerKey", index)
        if answer not in letters:
            raise ValueError(f"{self.name} row {index}: answerKey={answer!r} is not one of the labels {letters}")
        user = render_mc(self._field(row, "question", index), letters, list(choices["text"]))
        # Some ARC items have 3 or 5 choices or numeric labels: the item's own letters travel with it.
        return {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "letters": letters,
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """The picked letter equals answerKey."""
        return completion.strip() == conversation["messages"][-1]["content"]


class MMLU(_RowsTask):
    """MMLU multiple choice; `subset="auxiliary_train", split="train"` is the mid-training set."""

    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str = "all", split: str = "test", source: str = "cais/mmlu", **slicing: Any) -> None:
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU.split={split!r}: subset 'auxiliary_train' only has split 'train'")
        super().__init__(source, subset, split, **slicing)

    @property
    def name(self) -> str:
        return "MMLU" if self.subset != "auxiliary_train" else "MMLU-aux"

    @property
    def eval_type(self) -> EvalType:
        return "categorical"

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):
            row = row["train"]  # the hub's auxiliary_train rows are wrapped in a "train" struct
        choices, answer = list(self._field(row, "choices", index)), self._field(row, "answer", index)
        if len(choices) != len(self.letters) or not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise ValueError(
                f"{self.name} row {index}: needs 4 choices and answer in [0, 3], got {len(choices)} choices and "
                f"answer={answer!r}"
            )
        user = render_mc(self._field(row, "question", index), self.letters, choices)
        return {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": self.letters[answer]}],
            "letters": list(self.letters),
            "subject": row.get("subject", ""),
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """The picked letter equals the answer."""
        return completion.strip() == conversation["messages"][-1]["content"]


_CALC_RE = re.compile(r"(<<[^>]*>>)")


def gsm8k_to_parts(answer: str) -> list[dict[str, str]]:
    """GSM8K's `<<expr=result>>` annotations become python / python_output parts, as in nanochat."""
    parts: list[dict[str, str]] = []
    for piece in _CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(_RowsTask):
    """Grade-school math with calculator tool calls; graded by the `#### N` answer."""

    def __init__(self, subset: str = "main", split: str = "test", source: str = "openai/gsm8k", **slicing: Any) -> None:
        check_choice("GSM8K.subset", subset, ("main", "socratic"))
        check_choice("GSM8K.split", split, ("train", "test"))
        super().__init__(source, subset, split, **slicing)

    @property
    def name(self) -> str:
        return "GSM8K"

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        parts = gsm8k_to_parts(self._field(row, "answer", index))
        return {
            "messages": [
                {"role": "user", "content": self._field(row, "question", index)},
                {"role": "assistant", "content": parts},
            ]
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Exact match of the `#### N` number (commas ignored)."""
        reference = extract_final_answer(last_text(conversation["messages"][-1]))
        return reference is not None and extract_final_answer(completion) == reference


_CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, or the whole completion when there is none."""
    completion = strip_special(completion)
    match = _CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt, which a completion of only the function may omit."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


class HumanEval(_RowsTask):
    """HumanEval code generation, graded by running the tests in a sandboxed subprocess."""

    def __init__(
        self,
        split: str = "test",
        source: str = "openai/openai_humaneval",
        timeout: float = 10.0,
        memory_mb: int = 1024,
        **slicing: Any,
    ) -> None:
        super().__init__(source, None, split, **slicing)
        self.timeout, self.memory_mb = timeout, memory_mb

    @property
    def name(self) -> str:
        return "HumanEval"

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        prompt = self._field(row, "prompt", index)
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": prompt + self._field(row, "canonical_solution", index)},
            ],
            "task_id": self._field(row, "task_id", index),
            "entry_point": self._field(row, "entry_point", index),
            "test": self._field(row, "test", index),
        }

    def build_program(self, conversation: Conversation, completion: str) -> str:
        """Prompt imports + the completion's code + the task's tests + the call of check()."""
        prompt = conversation["messages"][0]["content"]
        return "\n\n".join(
            [
                extract_imports(prompt),
                extract_program(completion),
                conversation["test"],
                f"check({conversation['entry_point']})",
            ]
        )

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """True if the completion passes the task's tests in a separate, limited subprocess."""
        program = self.build_program(conversation, completion)
        return execute_program(program, timeout=self.timeout, memory_mb=self.memory_mb).passed


_ROLES = ("user", "assistant")


class SmolTalk(_RowsTask):
    """SmolTalk chat conversations for SFT / mid-training (an optional system message, then user/assistant turns)."""

    def __init__(
        self, split: str = "train", source: str = "HuggingFaceTB/smoltalk", subset: str = "all", **slicing: Any
    ) -> None:
        check_choice("SmolTalk.split", split, ("train", "test"))
        super().__init__(source, subset, split, **slicing)

    @property
    def name(self) -> str:
        return "SmolTalk"

    @property
    def eval_type(self) -> EvalType:
        return "generative"

    def get_example(self, index: int) -> Conversation:
        raw = self._field(self.rows[index], "messages", index)
        messages = [{"role": m["role"], "content": m["content"]} for m in raw]
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        for i, m in enumerate(turns):
            if m["role"] != _ROLES[i % 2] or not isinstance(m["content"], str):
                raise ValueError(
                    f"SmolTalk row {index} turn {i}: role={m['role']!r}, expected {_ROLES[i % 2]!r} with str content"
                )
        if len(turns) < 2:
            raise ValueError(f"SmolTalk row {index}: needs at least one user and one assistant turn")
        return {"messages": messages}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """SmolTalk has no reference grader; it is a training set."""
        raise NotImplementedError("SmolTalk is a training set without a grader")
