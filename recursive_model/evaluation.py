"""Score a model on eval tasks x recurrences: the table, plot and report card behind `rnc eval` (no Ray, no S3).

    report = evaluate_model(model, tokenizer, ["reasoning", "arc_easy"], [1, 2, 4, 8], adaptive="kl:5e-4")
    write_outputs(report, "out/", baseline=plain_gpt_report)  # eval.json, eval.md, eval.png, report_card.md

Every task is scored at every r: categorical tasks by the answer-letter logits (`run_categorical`), generative tasks
by greedy decoding (`run_generative`). With an adaptive spec (`kl:5e-4`, `latent:1e-3`) the generative tasks are
decoded once more at max r with that exit criterion, recording the recurrences each generated token actually used.
ChatCORE (nanochat) is the mean centred accuracy over the evaluated tasks, per r.

A plain GPT (n_recur = 0) ignores r: it is evaluated once and that result fills every requested r, so the report
keeps one schema (every task x every r) for recursive models and baselines alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from .config import EXIT_CRITERIA
from .engine import Engine
from .model import GPT
from .tasks import (
    ARC,
    GSM8K,
    MMLU,
    Arithmetic,
    EvalResult,
    EvalType,
    HumanEval,
    Reasoning,
    SpellingBee,
    Task,
    chatcore,
    run_categorical,
    run_generative,
)
from .tokenizer import Tokenizer

REPORT_FORMAT = 1
ADAPTIVE = "adaptive"  # column key of the adaptive-exit results, next to the integer r columns
ColumnKey = int | Literal["adaptive"]
OUTPUT_FILES = {"json": "eval.json", "markdown": "eval.md", "plot": "eval.png", "report_card": "report_card.md"}


# ------------------------------------------------------------------------------------------------------- eval tasks


@dataclass(frozen=True)
class EvalTaskSpec:
    """How to build the eval split of one task."""

    build: Callable[..., Task]  # called with no arguments, or with source=<path> for a hub task given a local copy
    hub: bool = False  # a public hub data set (downloaded by `datasets` unless a local source in hub format is given)


EVAL_TASKS: dict[str, EvalTaskSpec] = {
    # Generated tasks: no download, fixed held-out problems.
    "reasoning": EvalTaskSpec(partial(Reasoning, kind="chain", split="eval")),
    "reasoning_hard": EvalTaskSpec(partial(Reasoning, kind="chain", split="hard")),  # beyond training difficulty
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


def check_recurrences(recurrences: Sequence[int]) -> list[int]:
    """Sorted distinct r values; ValueError naming the first r that is not an int >= 1."""
    if isinstance(recurrences, str | bytes) or not recurrences:
        raise ValueError("recurrences must be a non-empty list of integers >= 1")
    for r in recurrences:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"recurrence r={r!r} is invalid: every r must be an integer >= 1")
    return sorted(set(recurrences))


def parse_adaptive(spec: str) -> tuple[str, float]:
    """'kl:5e-4' -> ('kl', 5e-4); ValueError naming the spec unless it is <criterion>:<threshold > 0>."""
    criteria = [c for c in EXIT_CRITERIA if c != "none"]
    criterion, sep, value = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not sep or criterion not in criteria or not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(
            f"adaptive spec {spec!r} is malformed: expected <criterion>:<threshold> with criterion in {criteria} "
            "and a threshold > 0, e.g. 'kl:5e-4' or 'latent:1e-3'"
        )
    return criterion, threshold


# ----------------------------------------------------------------------------------------------------------- report


def _column_label(key: ColumnKey) -> str:
    return ADAPTIVE if key == ADAPTIVE else f"r={key}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@dataclass
class EvalReport:
    """Scores of one model: every task at every r, plus the adaptive-exit run at max r when one was asked for."""

    tasks: list[str]  # eval task names (EVAL_TASKS keys), in evaluation order
    recurrences: list[int]  # sorted r values; every task has a result at each
    results: dict[str, dict[int, EvalResult]]  # task -> r -> result
    adaptive: str | None = None  # the adaptive spec, e.g. "kl:5e-4"; None when no adaptive run was made
    adaptive_results: dict[str, EvalResult] = field(default_factory=dict)  # task -> result at max r, adaptive exit
    recursive: bool = True  # False for a plain GPT, whose r columns all repeat one evaluation
    task_names: dict[str, str] = field(default_factory=dict)  # task -> the task's own name (e.g. "ARC-Easy")
    too_long: dict[str, int] = field(default_factory=dict)  # task -> problems whose prompt overflows the context
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> column label -> wall time
    model: dict[str, Any] = field(default_factory=dict)  # model_summary(): config, params, depth and FLOPs per r
    checkpoint: str = ""  # where the weights came from (URI), for the report card
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's meta.json (stage, step, ...)
    settings: dict[str, Any] = field(default_factory=dict)  # max_problems, max_tokens, batch_size, decoding

    def __post_init__(self) -> None:
        missing = [f"{t}@r={r}" for t in self.tasks for r in self.recurrences if r not in self.results.get(t, {})]
        if missing:
            raise ValueError(f"EvalReport: no result for {', '.join(missing)}")
        if self.adaptive is not None:
            parse_adaptive(self.adaptive)
            missing = [t for t in self.tasks if t not in self.adaptive_results]
            if missing:
                raise ValueError(
                    f"EvalReport: adaptive={self.adaptive!r} but no adaptive result for {', '.join(missing)}"
                )

    # --- columns ----------------------------------------------------------------------------------------------------
    @property
    def adaptive_recur(self) -> int | None:
        """The r budget of the adaptive run (the largest r), None without one."""
        return max(self.recurrences) if self.adaptive is not None else None

    def columns(self) -> list[ColumnKey]:
        """Column keys in table order: each r, then "adaptive" when present."""
        return [*self.recurrences, *([ADAPTIVE] if self.adaptive is not None else [])]

    def column(self, key: ColumnKey) -> dict[str, EvalResult]:
        """task -> result for one column."""
        if key == ADAPTIVE:
            return {t: self.adaptive_results[t] for t in self.tasks if t in self.adaptive_results}
        return {t: self.results[t][key] for t in self.tasks}

    def chatcore(self, key: ColumnKey) -> float:
        """ChatCORE of a column: mean centred accuracy over the tasks (chance 1/choices, 0 for generative)."""
        return chatcore(self.column(key))

    def mean_recur(self, key: ColumnKey) -> float | None:
        """Recurrences per generated token over all generative tasks of a column (None without generated tokens)."""
        used = tokens = 0.0
        for result in self.column(key).values():
            if result.mean_recur is not None and result.tokens_generated:
                used += result.mean_recur * result.tokens_generated
                tokens += result.tokens_generated
        return used / tokens if tokens else None

    def reference(self, task: str) -> EvalResult | None:
        """This report's single score for a task when it serves as a baseline: its result at its first r."""
        return self.results[task][self.recurrences[0]] if task in self.results else None

    # --- serialisation ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; ChatCORE and mean recurrences are included for readers, recomputed on load."""
        columns = self.columns()
        return {
            "format": REPORT_FORMAT,
            "checkpoint": self.checkpoint,
            "meta": self.meta,
            "model": self.model,
            "settings": self.settings,
            "recursive": self.recursive,
            "tasks": self.tasks,
            "task_names": self.task_names,
            "recurrences": self.recurrences,
            "results": {t: {str(r): res.to_dict() for r, res in by_r.items()} for t, by_r in self.results.items()},
            "adaptive": self.adaptive,
            "adaptive_recur": self.adaptive_recur,
            "adaptive_results": {t: res.to_dict() for t, res in self.adaptive_results.items()},
            "chatcore": {str(k): self.chatcore(k) for k in columns},
            "mean_recur": {str(k): self.mean_recur(k) for k in columns},
            "too_long": self.too_long,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        """The report as indented JSON text (what eval.json holds)."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        """Inverse of to_dict; derived fields (chatcore, mean_recur, adaptive_recur) are ignored."""
        if d.get("format") != REPORT_FORMAT:
            raise ValueError(f"eval report format {d.get('format')!r} is not supported (expected {REPORT_FORMAT})")
        return cls(
            tasks=list(d["tasks"]),
            recurrences=[int(r) for r in d["recurrences"]],
            results={t: {int(r): EvalResult(**res) for r, res in by_r.items()} for t, by_r in d["results"].items()},
            adaptive=d.get("adaptive"),
            adaptive_results={t: EvalResult(**res) for t, res in d.get("adaptive_results", {}).items()},
            recursive=bool(d.get("recursive", True)),
            task_names=dict(d.get("task_names", {})),
            too_long=dict(d.get("too_long", {})),
            seconds=dict(d.get("seconds", {})),
            model=dict(d.get("model", {})),
            checkpoint=d.get("checkpoint", ""),
            meta=dict(d.get("meta", {})),
            settings=dict(d.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        """Inverse of to_json."""
        return cls.from_dict(json.loads(text))

    # --- markdown ---------------------------------------------------------------------------------------------------
    def to_markdown(self, baseline: EvalReport | None = None) -> str:
        """The results table (rows: tasks, ChatCORE, recurrences per token; columns: r, adaptive, baseline) + notes."""
        columns = self.columns()
        header = ["task", "type", *(self._column_header(k) for k in columns)]
        if baseline is not None:
            header.append("baseline")
        lines = [_md_row(header), _md_row([":--", ":--", *["--:"] * (len(header) - 2)])]
        for task in self.tasks:
            first = self.results[task][self.recurrences[0]]
            row = [task, "mc" if first.eval_type == "categorical" else "gen"]
            row += [self._cell(self.column(k).get(task), adaptive=k == ADAPTIVE) for k in columns]
            if baseline is not None:
                row.append(self._cell(baseline.reference(task)))
            lines.append(_md_row(row))
        row = ["**ChatCORE**", "", *(f"**{self.chatcore(k):.3f}**" for k in columns)]
        if baseline is not None:
            shared = [t for t in self.tasks if t in baseline.results]
            row.append(f"{chatcore([baseline.reference(t) for t in shared]):.3f}" if shared else "—")
        lines.append(_md_row(row))
        row = ["recurrences / generated token", "", *(_fmt(self.mean_recur(k), 2) for k in columns)]
        if baseline is not None:
            row.append(_fmt(baseline.mean_recur(baseline.recurrences[0]), 2))
        lines.append(_md_row(row))
        return "\n".join(lines) + "\n\n" + self._notes(baseline)

    def _column_header(self, key: ColumnKey) -> str:
        if key == ADAPTIVE:
            return f"adaptive {self.adaptive} (r≤{self.adaptive_recur})"
        return f"r={key}"

    def _cell(self, result: EvalResult | None, adaptive: bool = False) -> str:
        if result is None:
            return "—"
        cell = f"{result.accuracy:.3f} ({result.num_correct}/{result.total})"
        if adaptive:
            # Generative: the recurrences actually used. Categorical: one full-depth forward pass, i.e. max r.
            used = f"{result.mean_recur:.2f} r/tok" if result.mean_recur is not None else f"r={self.adaptive_recur}"
            cell += f", {used}"
        return cell

    def _notes(self, baseline: EvalReport | None) -> str:
        settings = self.settings
        notes = [
            f"Accuracy (correct/total) per task; up to {settings.get('max_problems') or 'all'} problems per task, "
            f"greedy decoding, at most {settings.get('max_tokens', '?')} generated tokens. ChatCORE = mean centred "
            "accuracy over these tasks (chance level 1/choices for multiple choice, 0 for generative tasks)."
        ]
        if not self.recursive:
            notes.append("Plain GPT (no recurrent block): r has no effect, every r column repeats one evaluation.")
        if self.adaptive is not None:
            notes.append(
                f"Adaptive: decoding at r≤{self.adaptive_recur} with exit criterion {self.adaptive}; r/tok = mean "
                "recurrences per generated token actually used (the prompt pass, which yields the first token, "
                f"always runs all {self.adaptive_recur}). Multiple-choice tasks are scored from one forward pass over "
                f"the prompt, which always runs all {self.adaptive_recur} recurrences, so their adaptive cell repeats "
                f"r={self.adaptive_recur}."
            )
        if isinstance(baseline, EvalReport):
            notes.append(f"Baseline: {_describe_model(baseline)}.")
        for task, count in self.too_long.items():
            if count:
                context = self.model.get("config", {}).get("sequence_len", "?")
                notes.append(f"{task}: {count} prompt(s) longer than the {context}-token context, scored as wrong.")
        return "\n".join(f"- {note}" for note in notes) + "\n"

    # --- plot -------------------------------------------------------------------------------------------------------
    def plot(self, path: str | Path, baseline: EvalReport | None = None, title: str | None = None) -> Path:
        """PNG of accuracy vs r per task (log2 x axis) and ChatCORE vs r; the baseline as a dashed line per panel."""
        # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI in a headless worker.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = [*self.tasks, "ChatCORE"]
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        rs = self.recurrences
        for ax, panel in zip(axes, panels, strict=False):
            is_core = panel == "ChatCORE"
            ys = [self.chatcore(r) if is_core else self.results[panel][r].accuracy for r in rs]
            ax.plot(rs, ys, marker="o", label="fixed r")
            if self.adaptive is not None:
                x = self.mean_recur(ADAPTIVE) if is_core else self.adaptive_results[panel].mean_recur
                y = self.chatcore(ADAPTIVE) if is_core else self.adaptive_results[panel].accuracy
                if x:  # categorical tasks have no generated tokens: nothing adaptive to place on the r axis
                    ax.plot([x], [y], marker="*", markersize=13, linestyle="none", label=f"adaptive {self.adaptive}")
            ref = self._baseline_value(baseline, panel)
            if ref is not None:
                ax.axhline(
                    ref, linestyle="--", color="gray", label=f"baseline: {_describe_model(baseline, short=True)}"
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(rs, labels=[str(r) for r in rs])
            ax.minorticks_off()
            ax.set_title(panel if is_core else f"{panel} ({self.task_names.get(panel, panel)})", fontsize=10)
            ax.set_xlabel("recurrences r")
            ax.set_ylabel("ChatCORE" if is_core else "accuracy")
            if not is_core:
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title, fontsize=11)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110)
        return path

    @staticmethod
    def _baseline_value(baseline: EvalReport | None, panel: str) -> float | None:
        if baseline is None:
            return None
        if panel == "ChatCORE":
            return baseline.chatcore(baseline.recurrences[0])
        ref = baseline.reference(panel)
        return None if ref is None else ref.accuracy


# --------------------------------------------------------------------------------------------------------- evaluate


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
    exit_criterion: str = "none",
    exit_threshold: float | None = None,
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
            # "none", not None: None would fall back to the checkpoint's configured criterion and make fixed-r
            # columns silently adaptive.
            exit_criterion=exit_criterion,
            exit_threshold=exit_threshold,
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
    adaptive: str | None = None,
    max_problems: int | None = None,
    max_tokens: int = 256,
    batch_size: int = 8,
    sources: Mapping[str, str] | None = None,
    *,
    checkpoint: str = "",
    meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> EvalReport:
    """Score `model` on every task at every r (and adaptively at max r when `adaptive` is given).

    tasks: EVAL_TASKS names (built here, hub tasks from `sources` when given) or already built {name: Task}.
    max_problems: the first N problems of each task (None = all). Prompts longer than the context score as wrong.
    log: receives one progress line per task and setting (None = silent).
    Raises ValueError naming the problem for unknown tasks, r <= 0, a malformed adaptive spec, or an adaptive run
    on a plain GPT.
    """
    rs = check_recurrences(recurrences)
    criterion, threshold = parse_adaptive(adaptive) if adaptive is not None else ("none", None)
    _check_positive("max_problems", max_problems, allow_none=True)
    _check_positive("max_tokens", max_tokens)
    _check_positive("batch_size", batch_size)
    config = model.config
    if adaptive is not None and not config.is_recursive:
        raise ValueError(f"adaptive exit {adaptive!r} needs a recursive model; this one is a plain GPT (n_recur=0)")
    if isinstance(tasks, Mapping) and sources:
        raise ValueError("sources only apply to task names; build the tasks with build_eval_tasks(names, sources)")
    built = dict(tasks) if isinstance(tasks, Mapping) else build_eval_tasks(tasks, sources)
    if not built:
        raise ValueError("tasks must name at least one task")
    say = log or (lambda line: None)
    engine = Engine(model, tokenizer)
    results: dict[str, dict[int, EvalResult]] = {}
    adaptive_results: dict[str, EvalResult] = {}
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
                results[name][r] = score(num_recur=r if config.is_recursive else None)
                seconds[name][f"r={r}"] = time.perf_counter() - t0
                say(_progress_line(name, f"r={r}", results[name][r], seconds[name][f"r={r}"]))
            if adaptive is None:
                continue
            if problems.eval_type == "categorical":
                # One forward pass over the prompt runs every recurrence: adaptive exit only applies to decoding.
                adaptive_results[name] = results[name][rs[-1]]
                continue
            t0 = time.perf_counter()
            adaptive_results[name] = score(num_recur=rs[-1], exit_criterion=criterion, exit_threshold=threshold)
            seconds[name][ADAPTIVE] = time.perf_counter() - t0
            say(_progress_line(name, f"{adaptive} r<={rs[-1]}", adaptive_results[name], seconds[name][ADAPTIVE]))
    finally:
        model.train(was_training)
    report = EvalReport(
        tasks=list(built),
        recurrences=rs,
        results=results,
        adaptive=adaptive,
        adaptive_results=adaptive_results,
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


# ---------------------------------------------------------------------------------------------------------- outputs


def _describe_model(report: EvalReport, short: bool = False) -> str:
    """One line: architecture, and unless short the parameters and the checkpoint it came from."""
    info, cfg = report.model, report.model.get("config", {})
    params = f"{info['num_params']:,} params" if "num_params" in info else "params unknown"
    if cfg.get("n_recur", 0) > 0:
        shape = f"recursive GPT (prelude {cfg['n_prelude']}, recurrent block {cfg['n_recur']}, coda {cfg['n_coda']})"
    elif cfg:
        shape = f"plain GPT, {cfg.get('n_prelude', 0) + cfg.get('n_coda', 0)} layers"
    else:
        shape = "model"
    if short:
        return shape
    where = f" from `{report.checkpoint}`" if report.checkpoint else ""
    return f"{shape}, {params}{where}"


def _checkpoint_section(report: EvalReport, baseline: EvalReport | None) -> list[str]:
    info, cfg = report.model, report.model.get("config", {})
    lines = ["## Checkpoint", ""]
    lines.append(f"- model: {_describe_model(report)}")
    stage = {k: report.meta[k] for k in ("stage", "step") if k in report.meta}
    if stage:
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in stage.items()))
    if cfg:
        lines.append(
            f"- width {cfg['n_embd']}, {cfg['n_head']} heads ({cfg['n_kv_head']} kv), vocab {cfg['vocab_size']}, "
            f"context {cfg['sequence_len']}"
        )
        if cfg.get("n_recur", 0) > 0:
            lines.append(
                f"- training recurrences: mean {cfg['train_recur_mean']}, max {cfg['train_recur_max']}, "
                f"sigma {cfg['recur_sigma']}, bptt_k {cfg['bptt_k']}; default eval r {cfg['eval_recur']}"
            )
    if baseline is not None:
        lines.append(f"- baseline: {_describe_model(baseline)}")
    depth, flops = info.get("effective_depth", {}), info.get("flops_per_token", {})
    if depth:
        lines += ["", _md_row(["r", "effective depth (layers)", "inference MFLOPs / token"]), _md_row(["--:"] * 3)]
        lines += [_md_row([r, str(depth[r]), f"{flops.get(r, 0) / 1e6:.2f}"]) for r in depth]
    return lines


def _adaptive_section(report: EvalReport) -> list[str]:
    r_max = report.adaptive_recur
    lines = [
        "## Adaptive exit",
        "",
        f"Exit criterion `{report.adaptive}`, at most r={r_max} recurrences per token.",
        "",
    ]
    lines += [
        _md_row(
            ["task", f"accuracy r={r_max}", "accuracy adaptive", "recurrences / generated token", "recurrences saved"]
        ),
        _md_row([":--", "--:", "--:", "--:", "--:"]),
    ]
    for task in report.tasks:
        fixed, adaptive = report.results[task][r_max], report.adaptive_results[task]
        mean = adaptive.mean_recur if adaptive.eval_type == "generative" else None
        saved = f"{1 - mean / r_max:.0%}" if mean is not None and r_max else "—"
        lines.append(_md_row([task, f"{fixed.accuracy:.3f}", f"{adaptive.accuracy:.3f}", _fmt(mean, 2), saved]))
    mean = report.mean_recur(ADAPTIVE)
    lines.append(
        _md_row(["**all generative**", "", "", f"**{_fmt(mean, 2)}**", f"{1 - mean / r_max:.0%}" if mean else "—"])
    )
    return lines


def write_outputs(
    report: EvalReport,
    out_dir: str | Path,
    baseline: EvalReport | None = None,
    title: str | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write eval.json, eval.md, eval.png and report_card.md into `out_dir`; returns {kind: path}.

    The report card holds the checkpoint summary, the full table (every r), the plot, the adaptive results and
    `extra_sections` ({heading: markdown}, e.g. per-stage training metrics) in the order given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in OUTPUT_FILES.items()}
    title = title or f"Report card: {report.checkpoint or 'model'}"
    table = report.to_markdown(baseline)

    data = report.to_dict()
    if baseline is not None:
        data["baseline"] = baseline.to_dict()  # self-contained: the plot can be redrawn from eval.json alone
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"].write_text(f"# Eval: {report.checkpoint or 'model'}\n\n{table}")
    report.plot(paths["plot"], baseline=baseline, title=title)

    card = [f"# {title}", "", *_checkpoint_section(report, baseline), "", "## Evaluation: score vs recurrences", ""]
    card += [table, f"![score vs recurrences]({OUTPUT_FILES['plot']})", ""]
    if report.adaptive is not None:
        card += [*_adaptive_section(report), ""]
    for heading, body in (extra_sections or {}).items():
        card += [f"## {heading}", "", body.rstrip(), ""]
    paths["report_card"].write_text("\n".join(card))
    return paths


def load_report(path: str | Path) -> tuple[EvalReport, EvalReport | None]:
    """(report, baseline or None) from an eval.json written by write_outputs."""
    data = json.loads(Path(path).read_text())
    baseline = data.get("baseline")
    return EvalReport.from_dict(data), EvalReport.from_dict(baseline) if baseline else None


__all__ = [
    "ADAPTIVE",
    "EVAL_TASKS",
    "OUTPUT_FILES",
    "EvalReport",
    "EvalTaskSpec",
    "build_eval_tasks",
    "check_recurrences",
    "check_task_names",
    "evaluate_model",
    "load_report",
    "model_summary",
    "parse_adaptive",
    "write_outputs",
]
