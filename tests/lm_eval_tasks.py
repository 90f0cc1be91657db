"""The local multiple-choice task both lm-eval tests score (the exported `hf` model and `local-completions` against
the server): rows, their jsonl in the MMLU schema that `rnc eval`'s loader reads, and the lm-eval task config that
reads the same file without any network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recursive_model.tasks.base import render_mc

LETTERS = ["A", "B", "C", "D"]
MC_ROWS = [
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Which of these is a fruit?", ["apple", "carrot", "potato", "onion"], 0),
    ("What colour is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("How many legs has a spider?", ["six", "eight", "ten", "four"], 1),
    ("Which is a prime number?", ["4", "6", "9", "7"], 3),
    ("Water freezes at how many degrees Celsius?", ["0", "10", "100", "-10"], 0),
    ("Which animal says moo?", ["cat", "dog", "cow", "duck"], 2),
]


def write_mc_jsonl(path: Path) -> Path:
    """MC_ROWS as MMLU rows plus `prompt` (lm-eval's text: nanochat's multiple-choice prompt) and `letters`."""
    with path.open("w") as f:
        for question, choices, answer in MC_ROWS:
            row = {"question": question, "subject": "misc", "choices": choices, "answer": answer}
            f.write(json.dumps({**row, "prompt": render_mc(question, LETTERS, choices), "letters": LETTERS}) + "\n")
    return path


def mc_task_config(name: str, jsonl: Path | str) -> dict[str, Any]:
    """An lm-eval multiple-choice (loglikelihood) task over `jsonl`, scored like rnc's categorical eval."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{letters}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",  # the letter follows <|assistant_start|> directly, as in rnc's categorical eval
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
