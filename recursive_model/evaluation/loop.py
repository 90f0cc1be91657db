"""The evaluation loop: score a model on every task at every r, and adaptively at max r (no Ray, no S3)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from ..engine import Engine
from ..model import GPT
from ..recurrence import ExitRule
from ..tasks import EvalResult, EvalType, Task, run_categorical, run_generative
from ..tokenizer import Tokenizer
from .arguments import check_adaptive, check_recurrences
from .depth import answer_depth, one_token_answers
from .registry import build_eval_tasks
from .report import ADAPTIVE, ColumnKey, EvalReport


def _column_label(key: ColumnKey) -> str:
    return ADAPTIVE if key == ADAPTIVE else f"r={key}"


class _Problems(Task):
    """The problems of a task at given indices: the first max_problems whose prompt fits the model's context."""

    def __init__(self, base: Task, indices: list[int]) -> None:
        super().__init__()
        self.base, self.indices = base, indices
        self.letters = base.letters

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def eval_type(self) -> EvalType:
        return self.base.eval_type

    def num_examples(self) -> int:
        return len(self.indices)

    def get_example(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        return self.base.evaluate(conversation, completion)


def _fitting_problems(task: Task, tokenizer: Tokenizer, max_problems: int | None, context: int) -> tuple[Task, int]:
    """(the problems that fit the context, number that do not). A long prompt would abort the whole eval inside the
    model or the engine; scoring it as wrong instead keeps every other number and the denominators honest."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    # A categorical prompt only needs to fit; a generative one needs room for at least one generated token.
    limit = context if task.eval_type == "categorical" else context - 1
    fits = [i for i in range(n) if len(tokenizer.render_for_completion(task[i])) <= limit]
    return _Problems(task, fits), n - len(fits)


def _score(
    model: GPT,
    engine: Engine,
    tokenizer: Tokenizer,
    problems: Task,
    too_long: int,
    num_recur: int | None,
    max_tokens: int,
    batch_size: int,
    exit: ExitRule | None = None,
) -> EvalResult:
    if problems.eval_type == "categorical":
        result = run_categorical(model, tokenizer, problems, num_recur=num_recur, batch_size=batch_size)
    else:
        result = run_generative(
            engine,
            tokenizer,
            problems,
            num_recur=num_recur,
            max_tokens=max_tokens,
            temperature=0.0,
            batch_size=batch_size,
            exit=exit,  # always given: fixed-r columns must not inherit an exit rule of the checkpoint's config
        )
    if too_long:
        total = result.total + too_long
        result = dataclasses.replace(result, total=total, accuracy=result.num_correct / total)
    return result


def model_summary(model: GPT, recurrences: Sequence[int]) -> dict[str, Any]:
    """Config, parameter count, and effective depth and inference FLOPs per token at each r (for report cards)."""
    config = model.config
    return {
        "config": config.to_dict(),
        "num_params": model.num_params(),
        "recursive": config.is_recursive,
        "effective_depth": {str(r): model.effective_depth(r) for r in recurrences},
        "flops_per_token": {str(r): model.flops_per_token(r, training=False) for r in recurrences},
    }


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1{' or None' if allow_none else ''}")


def evaluate_model(
    model: GPT,
    tokenizer: Tokenizer,
    tasks: Sequence[str] | Mapping[str, Task],
    recurrences: Sequence[int],
    adaptive: ExitRule | None = None,
    max_problems: int | None = None,
    max_tokens: int = 256,
    batch_size: int = 8,
    sources: Mapping[str, str] | None = None,
    *,
    checkpoint: str = "",
    meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> EvalReport:
    """Score `model` on every task at every r (and adaptively at max r with the `adaptive` exit rule when given).

    tasks: EVAL_TASKS names (built here, hub tasks from `sources` when given) or already built {name: Task}.
    max_problems: the first N problems of each task (None = all). Prompts longer than the context score as wrong.
    log: receives one progress line per task and setting (None = silent).
    Raises ValueError naming the problem for unknown tasks, r <= 0, an adaptive rule that is not an ExitRule, or an
    adaptive run on a plain GPT.
    """
    rs = check_recurrences(recurrences)
    adaptive = check_adaptive(adaptive)
    _check_positive("max_problems", max_problems, allow_none=True)
    _check_positive("max_tokens", max_tokens)
    _check_positive("batch_size", batch_size)
    config = model.config
    if adaptive is not None and not config.is_recursive:
        raise ValueError(f"adaptive exit '{adaptive}' needs a recursive model; this one is a plain GPT (n_recur=0)")
    if isinstance(tasks, Mapping) and sources:
        raise ValueError("sources only apply to task names; build the tasks with build_eval_tasks(names, sources)")
    built = dict(tasks) if isinstance(tasks, Mapping) else build_eval_tasks(tasks, sources)
    if not built:
        raise ValueError("tasks must name at least one task")
    say = log or (lambda line: None)
    engine = Engine(model, tokenizer)
    results: dict[str, dict[int, EvalResult]] = {}
    adaptive_results: dict[str, EvalResult] = {}
    depth_results: dict[str, EvalResult] = {}
    task_names, too_long, seconds = {}, {}, {}
    was_training = model.training
    model.eval()
    try:
        for name, task in built.items():
            problems, too_long[name] = _fitting_problems(task, tokenizer, max_problems, config.sequence_len)
            task_names[name], seconds[name], results[name] = task.name, {}, {}
            score = partial(
                _score, model, engine, tokenizer, problems, too_long[name], max_tokens=max_tokens, batch_size=batch_size
            )
            for r in rs:
                if not config.is_recursive and r != rs[0]:
                    results[name][r] = results[name][rs[0]]  # a plain GPT ignores r: one evaluation serves all
                    continue
                t0 = time.perf_counter()
                results[name][r] = score(num_recur=r if config.is_recursive else None, exit=None)
                seconds[name][f"r={r}"] = time.perf_counter() - t0
                say(_progress_line(name, f"r={r}", results[name][r], seconds[name][f"r={r}"]))
            if adaptive is None:
                continue
            if problems.eval_type == "categorical":
                # One forward pass over the prompt runs every recurrence: adaptive exit only applies to decoding.
                adaptive_results[name] = results[name][rs[-1]]
                continue
            t0 = time.perf_counter()
            adaptive_results[name] = score(num_recur=rs[-1], exit=adaptive)
            seconds[name][ADAPTIVE] = time.perf_counter() - t0
            say(_progress_line(name, f"{adaptive} r<={rs[-1]}", adaptive_results[name], seconds[name][ADAPTIVE]))
            if one_token_answers(problems, tokenizer):  # the prompt's depth is what adapts (evaluation.depth)
                t0 = time.perf_counter()
                depth = answer_depth(model, tokenizer, problems, rs[-1], [adaptive], batch_size=max(batch_size, 64))
                depth_results[name] = depth.result(adaptive, task.name)
                seconds[name]["depth"] = time.perf_counter() - t0
                say(_progress_line(name, f"{adaptive} per problem", depth_results[name], seconds[name]["depth"]))
    finally:
        model.train(was_training)
    report = EvalReport(
        tasks=list(built),
        recurrences=rs,
        results=results,
        adaptive=adaptive,
        adaptive_results=adaptive_results,
        depth_results=depth_results,
        recursive=config.is_recursive,
        task_names=task_names,
        too_long=too_long,
        seconds=seconds,
        model=model_summary(model, rs),
        checkpoint=checkpoint,
        meta=dict(meta or {}),
        settings={
            "max_problems": max_problems,
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "decoding": "greedy",
        },
    )
    for key in report.columns():
        say(f"[eval] ChatCORE {_column_label(key):<18} {report.chatcore(key):.4f}")
    return report


def _progress_line(task: str, setting: str, result: EvalResult, seconds: float) -> str:
    recur = f"  {result.mean_recur:.2f} r/tok" if result.mean_recur is not None else ""
    return (
        f"[eval] {task:<18} {setting:<18} acc {result.accuracy:.3f} ({result.num_correct}/{result.total})"
        f"{recur}  {seconds:.1f}s"
    )
