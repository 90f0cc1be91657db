"""The eval tasks by name: how to build the eval split of each, and validation of task names (no Ray, no S3)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from ..tasks import ARC, GSM8K, MMLU, Arithmetic, HumanEval, Reasoning, SpellingBee, Task


@dataclass(frozen=True)
class EvalTaskSpec:
    """How to build the eval split of one task."""

    build: Callable[..., Task]  # called with no arguments, or with source=<path> for a hub task given a local copy
    hub: bool = False  # a public hub data set (downloaded by `datasets` unless a local source in hub format is given)


EVAL_TASKS: dict[str, EvalTaskSpec] = {
    # Generated tasks: no download, fixed held-out problems.
    "reasoning": EvalTaskSpec(partial(Reasoning, kind="pointer", split="eval")),
    "reasoning_hard": EvalTaskSpec(partial(Reasoning, kind="pointer", split="hard")),  # beyond training difficulty
    # State tracking (walks of 2-4 moves; hard: 5-8, never trained), the depth task of the embedded default and of
    # benchmarks/depth_pays.py: with causal attention windows, more recurrences reach further back.
    "walk": EvalTaskSpec(partial(Reasoning, kind="walk", split="eval")),
    "walk_hard": EvalTaskSpec(partial(Reasoning, kind="walk", split="hard")),
    "reasoning_chain": EvalTaskSpec(partial(Reasoning, kind="chain", split="eval")),  # variable tracking with +-
    "reasoning_sum": EvalTaskSpec(partial(Reasoning, kind="sum", split="eval")),
    "reasoning_sum_hard": EvalTaskSpec(partial(Reasoning, kind="sum", split="hard")),
    # max_digits=2 matches the CPU mixtures (mid-cpu, sft-cpu), the only ones that train arithmetic.
    "arithmetic": EvalTaskSpec(partial(Arithmetic, split="eval", max_digits=2)),
    "spelling_bee": EvalTaskSpec(partial(SpellingBee, split="eval")),
    # Hub tasks: the test splits nanochat's ChatCORE uses.
    "arc_easy": EvalTaskSpec(partial(ARC, subset="ARC-Easy", split="test"), hub=True),
    "arc_challenge": EvalTaskSpec(partial(ARC, subset="ARC-Challenge", split="test"), hub=True),
    "mmlu": EvalTaskSpec(partial(MMLU, subset="all", split="test"), hub=True),
    "gsm8k": EvalTaskSpec(partial(GSM8K, split="test"), hub=True),
    "humaneval": EvalTaskSpec(partial(HumanEval, split="test"), hub=True),
}


def check_task_names(names: Sequence[str]) -> list[str]:
    """The task names in order without repeats; ValueError naming an unknown task and listing the known ones."""
    if isinstance(names, str) or not names:
        raise ValueError(f"tasks must be a non-empty list of task names; known: {', '.join(EVAL_TASKS)}")
    for name in names:
        if name not in EVAL_TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(EVAL_TASKS)}")
    return list(dict.fromkeys(names))


def build_eval_tasks(names: Sequence[str], sources: Mapping[str, str] | None = None) -> dict[str, Task]:
    """Build the eval split of each named task; `sources` maps hub task names to local files in the hub format."""
    names = check_task_names(names)
    sources = dict(sources or {})
    for name in sources:
        if name not in EVAL_TASKS:
            raise ValueError(f"source given for unknown task {name!r}; known: {', '.join(EVAL_TASKS)}")
        if not EVAL_TASKS[name].hub:
            hub = [n for n, spec in EVAL_TASKS.items() if spec.hub]
            raise ValueError(f"task {name!r} is generated and takes no source; tasks with a source: {', '.join(hub)}")
    tasks = {}
    for name in names:
        spec = EVAL_TASKS[name]
        tasks[name] = spec.build(source=sources[name]) if name in sources else spec.build()
    return tasks
