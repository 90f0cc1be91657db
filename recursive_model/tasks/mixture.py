"""Task registry, training mixtures declared from config, and the named mixture presets.

A mixture spec is a list of entries `{"source": <registry name>, "count": n | "weight": w, "kwargs": {...}}`:
  count   exactly n examples of that task (cycling through it when n > len(task));
  weight  w * len(task) examples (1.0 = one pass, 2.0 = two passes, 0.1 = a tenth), rounded;
  kwargs  constructor arguments (e.g. `{"split": "train", "source": "data/gsm8k.jsonl"}` for a local file).
The examples of every entry are then shuffled together with one seed: same spec + seed -> same sequence.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from recursive_model.tasks.base import Conversation, EvalType, Task
from recursive_model.tasks.generated import Arithmetic, Identity, SpellingBee
from recursive_model.tasks.loaders import ARC, GSM8K, MMLU, HumanEval, SmolTalk
from recursive_model.tasks.reasoning import Reasoning

TASK_REGISTRY: dict[str, Callable[..., Task]] = {
    "identity": Identity,
    "arithmetic": Arithmetic,
    "spelling_bee": SpellingBee,
    "reasoning": Reasoning,
    "smoltalk": SmolTalk,
    "mmlu_aux": partial(MMLU, subset="auxiliary_train", split="train"),
    "gsm8k": GSM8K,
    "arc_easy": partial(ARC, subset="ARC-Easy"),
    "arc_challenge": partial(ARC, subset="ARC-Challenge"),
    "mmlu": MMLU,
    "humaneval": HumanEval,
}

_SPEC_KEYS = ("source", "count", "weight", "kwargs")


def build_task(name: str, **kwargs: Any) -> Task:
    """Construct a registered task by name; unknown names raise ValueError listing the known ones."""
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task source {name!r}; known: {sorted(TASK_REGISTRY)}")
    return TASK_REGISTRY[name](**kwargs)


def _entry_count(entry: Mapping[str, Any], task: Task, position: int) -> int:
    has_count, has_weight = "count" in entry, "weight" in entry
    if has_count == has_weight:
        raise ValueError(f"mixture entry {position} ({entry.get('source')!r}) needs exactly one of 'count', 'weight'")
    if has_count:
        count = entry["count"]
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"mixture entry {position}: count={count!r} must be an int >= 0")
        return count
    weight = entry["weight"]
    if not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"mixture entry {position}: weight={weight!r} must be a number >= 0")
    return round(weight * len(task))


class TaskMixture(Task):
    """A deterministic, seeded shuffle of examples drawn from several tasks; a Task itself, so it slices too."""

    def __init__(self, spec: Sequence[Mapping[str, Any]], seed: int = 0, **slicing: Any) -> None:
        super().__init__(**slicing)
        if not spec:
            raise ValueError("TaskMixture spec must list at least one entry")
        self.tasks: list[Task] = []
        self.names: list[str] = []
        task_ids, example_ids = array("l"), array("q")  # compact: SmolTalk-sized mixtures have ~1M entries
        for position, entry in enumerate(spec):
            unknown = set(entry) - set(_SPEC_KEYS)
            if unknown or "source" not in entry:
                raise ValueError(
                    f"mixture entry {position} has keys {sorted(entry)}; allowed {list(_SPEC_KEYS)}, 'source' required"
                )
            task = build_task(entry["source"], **dict(entry.get("kwargs", {})))
            count, size = _entry_count(entry, task, position), len(task)
            if count and not size:
                raise ValueError(f"mixture entry {position} ({entry['source']!r}) is empty but count={count}")
            rng = random.Random(f"mixture/{seed}/{position}")
            full, rest = divmod(count, size) if size else (0, 0)
            picks = list(range(size)) * full + sorted(rng.sample(range(size), rest))
            task_ids.extend([len(self.tasks)] * len(picks))
            example_ids.extend(picks)
            self.tasks.append(task)
            self.names.append(entry["source"])
        order = list(range(len(task_ids)))
        random.Random(f"mixture/{seed}").shuffle(order)
        self._task_ids = array("l", (task_ids[i] for i in order))
        self._example_ids = array("q", (example_ids[i] for i in order))

    @property
    def eval_type(self) -> EvalType:
        raise NotImplementedError("a TaskMixture is for training; evaluate its source tasks instead")

    def num_examples(self) -> int:
        return len(self._task_ids)

    def source_of(self, index: int) -> str:
        """Registry name of the task an underlying index comes from."""
        return self.names[self._task_ids[index]]

    def counts(self) -> dict[str, int]:
        """Number of examples per source name."""
        out: dict[str, int] = {}
        for task_id in self._task_ids:
            out[self.names[task_id]] = out.get(self.names[task_id], 0) + 1
        return out

    def get_example(self, index: int) -> Conversation:
        return self.tasks[self._task_ids[index]][self._example_ids[index]]


# CPU presets use only generated tasks (no network, seconds to build); real presets follow nanochat's mid / SFT mixes
# with hub sources (swap "kwargs": {"source": "<local file>"} in to train from a local copy).
MIXTURE_PRESETS: dict[str, list[dict[str, Any]]] = {
    # The embedded default: walks (the depth task, with the digit after each move as intermediate targets) beside the
    # chat tasks its eval also scores (arithmetic, spelling_bee) and the model's identity.
    "mid-cpu": [
        {"source": "identity", "count": 500},
        {"source": "arithmetic", "count": 2000, "kwargs": {"size": 2000, "max_digits": 2}},
        {"source": "spelling_bee", "count": 1000, "kwargs": {"size": 1000}},
        {"source": "reasoning", "count": 12_000, "kwargs": {"kind": "walk", "size": 12_000, "state_targets": True}},
    ],
    "sft-cpu": [
        {"source": "identity", "count": 200, "kwargs": {"seed": 1}},
        {"source": "arithmetic", "count": 500, "kwargs": {"size": 500, "seed": 1, "max_digits": 2}},
        {"source": "spelling_bee", "count": 300, "kwargs": {"size": 300, "seed": 1}},
        {"source": "reasoning", "count": 3000, "kwargs": {"kind": "walk", "size": 3000, "seed": 1,
                                                          "state_targets": True}},
    ],
    # State tracking only (walks of 1-4 moves, intermediate targets): the data of benchmarks/depth_pays.py.
    "depth": [
        {"source": "reasoning", "count": 20_000, "kwargs": {"kind": "walk", "size": 20_000, "seed": 2,
                                                           "state_targets": True}},
    ],
    # Pointer chasing only (1-4 hops): the earlier depth task (`benchmarks/depth_pays.py --kind pointer`).
    "depth-pointer": [
        {"source": "reasoning", "count": 20_000, "kwargs": {"kind": "pointer", "size": 20_000, "seed": 2}},
    ],
    "mid-real": [
        {"source": "smoltalk", "weight": 1.0, "kwargs": {"split": "train"}},
        {"source": "mmlu_aux", "weight": 1.0},
        {"source": "gsm8k", "weight": 1.0, "kwargs": {"split": "train"}},
        {"source": "identity", "count": 2000},
        {"source": "spelling_bee", "count": 80_000, "kwargs": {"size": 80_000}},
        {"source": "reasoning", "count": 50_000, "kwargs": {"size": 50_000}},
    ],
    "sft-real": [
        {"source": "arc_easy", "weight": 1.0, "kwargs": {"split": "train"}},
        {"source": "arc_challenge", "weight": 1.0, "kwargs": {"split": "train"}},
        {"source": "gsm8k", "weight": 1.0, "kwargs": {"split": "train"}},
        {"source": "smoltalk", "count": 10_000, "kwargs": {"split": "test"}},
        {"source": "identity", "count": 1000, "kwargs": {"seed": 1}},
        {"source": "spelling_bee", "count": 300, "kwargs": {"size": 300, "seed": 1}},
        {"source": "reasoning", "count": 5000, "kwargs": {"size": 5000, "seed": 1}},
    ],
}


def build_mixture(spec: str | Sequence[Mapping[str, Any]], seed: int = 0, **slicing: Any) -> TaskMixture:
    """A TaskMixture from a preset name or an explicit spec; unknown preset names raise ValueError listing them."""
    if isinstance(spec, str):
        if spec not in MIXTURE_PRESETS:
            raise ValueError(f"unknown mixture preset {spec!r}; known: {sorted(MIXTURE_PRESETS)}")
        spec = MIXTURE_PRESETS[spec]
    return TaskMixture(spec, seed=seed, **slicing)
