"""Eval runners written against the model / Engine interfaces of docs/DESIGN.md (objects in, so tests pass fakes).

run_categorical: one forward pass per batch; the answer is the choice letter with the highest logit at the position
  right after `render_for_completion` (nanochat's ChatCORE categorical eval, no sampling).
run_generative: `engine.generate_batch` on the rendered prompts, graded by `task.evaluate`; also reports the mean
  number of recurrences per generated token, which differs from num_recur when an exit rule is on.
"""

from __future__ import annotations

from typing import Any

import torch

from recursive_model.recurrence import ExitRule
from recursive_model.tasks.base import Task
from recursive_model.tasks.scoring import EvalResult


def _problem_count(task: Task, max_problems: int | None) -> int:
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems={max_problems} must be None or >= 1")
    return len(task) if max_problems is None else min(len(task), max_problems)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def letter_token_id(tokenizer: Any, letter: str) -> int:
    """The single token id of an answer letter; ValueError if the tokenizer splits it."""
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; categorical eval needs 1")
    return ids[0]


@torch.no_grad()
def run_categorical(
    model: Any,
    tokenizer: Any,
    task: Task,
    num_recur: int | None = None,
    batch_size: int = 8,
    max_problems: int | None = None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Accuracy of picking, among each item's letters, the one with the highest next-token logit."""
    if task.eval_type != "categorical":
        raise ValueError(f"run_categorical needs a categorical task, {task.name} is {task.eval_type!r}")
    _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id works: padded positions are never read
    letter_ids: dict[str, int] = {}
    n, correct, max_choices = _problem_count(task, max_problems), 0, len(task.letters)
    for start in range(0, n, batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids, num_recur=num_recur)  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
            letters = list(conversation.get("letters", task.letters))
            max_choices = max(max_choices, len(letters))
            for letter in letters:
                if letter not in letter_ids:
                    letter_ids[letter] = letter_token_id(tokenizer, letter)
            choice_logits = logits[row, len(prompt) - 1, [letter_ids[x] for x in letters]]
            predicted = letters[int(choice_logits.argmax())]
            correct += bool(task.evaluate(conversation, predicted))
    return EvalResult(
        task=task.name,
        eval_type="categorical",
        accuracy=correct / n if n else 0.0,
        num_correct=correct,
        total=n,
        num_choices=max_choices,
        num_recur=num_recur,
    )


def run_generative(
    engine: Any,
    tokenizer: Any,
    task: Task,
    num_recur: int | None = None,
    max_tokens: int = 256,
    exit: ExitRule | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_problems: int | None = None,
    **engine_kwargs: Any,
) -> EvalResult:
    """Accuracy of generated completions under `task.evaluate`, plus mean recurrences per generated token.

    `exit` is the adaptive exit rule; None means every token runs num_recur recurrences, whatever the checkpoint's
    config says (it is always passed on, so a fixed-r score never becomes adaptive by inheritance).
    Extra keyword arguments (kv_cache, warm_start) go to `engine.generate_batch` unchanged.
    """
    if task.eval_type != "generative":
        raise ValueError(f"run_generative needs a generative task, {task.name} is {task.eval_type!r}")
    _check_batch_size(batch_size)
    n, correct, total_recur, total_tokens = _problem_count(task, max_problems), 0, 0, 0
    by_difficulty: dict[str, list[int]] = {}  # difficulty -> [problems, correct, recurrences, tokens]
    for start in range(0, n, batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        results = engine.generate_batch(
            prompts,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed + start,  # distinct per batch, identical across runs
            num_recur=num_recur,
            exit=exit,
            **engine_kwargs,
        )
        if len(results) != len(prompts):
            raise RuntimeError(f"engine returned {len(results)} results for {len(prompts)} prompts")
        for conversation, result in zip(conversations, results, strict=True):
            right = bool(task.evaluate(conversation, result.text))
            correct += right
            total_recur += sum(result.recurs)
            total_tokens += len(result.recurs)
            if conversation.get("difficulty") is not None:
                tally = by_difficulty.setdefault(str(conversation["difficulty"]), [0, 0, 0, 0])
                for i, v in enumerate((1, right, sum(result.recurs), len(result.recurs))):
                    tally[i] += v
    return EvalResult(
        task=task.name,
        eval_type="generative",
        accuracy=correct / n if n else 0.0,
        num_correct=correct,
        total=n,
        num_recur=num_recur,
        mean_recur=total_recur / total_tokens if total_tokens else None,
        tokens_generated=total_tokens,
        by_difficulty={
            d: {"total": k, "num_correct": c, "accuracy": c / k, "mean_recur": r / t if t else None,
                "tokens_generated": t}
            for d, (k, c, r, t) in sorted(by_difficulty.items(), key=lambda item: int(item[0]))
        } or None,
    )
