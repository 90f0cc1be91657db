"""EvalReport: the scores of one model (every task x every r, plus the adaptive run), its JSON form, markdown table
and plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..recurrence import ExitRule
from ..tasks import EvalResult, chatcore
from .arguments import check_adaptive

REPORT_FORMAT = 1
ADAPTIVE = "adaptive"  # column key of the adaptive-exit results, next to the integer r columns
ColumnKey = int | Literal["adaptive"]


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
    adaptive: ExitRule | None = None  # the adaptive exit rule; None when no adaptive run was made
    adaptive_results: dict[str, EvalResult] = field(default_factory=dict)  # task -> result at max r, adaptive exit
    recursive: bool = True  # False for a plain GPT, whose r columns all repeat one evaluation
    task_names: dict[str, str] = field(default_factory=dict)  # task -> the task's own name (e.g. "ARC-Easy")
    too_long: dict[str, int] = field(default_factory=dict)  # task -> problems whose prompt overflows the context
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> column label -> wall time
    model: dict[str, Any] = field(default_factory=dict)  # model_summary(): config, params, depth and FLOPs per r
    checkpoint: str = ""  # where the weights came from (URI), for the report card
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's meta.json (stage, step, ...)
    settings: dict[str, Any] = field(default_factory=dict)  # max_problems, max_tokens, batch_size, decoding
    # task -> the adaptive rule applied per problem (evaluation.depth: one forward, the exit at the answer position,
    # the whole prompt at that depth); tasks whose answers are one token, when an adaptive rule is given
    depth_results: dict[str, EvalResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [f"{t}@r={r}" for t in self.tasks for r in self.recurrences if r not in self.results.get(t, {})]
        if missing:
            raise ValueError(f"EvalReport: no result for {', '.join(missing)}")
        if check_adaptive(self.adaptive) is not None:
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
            "adaptive": None if self.adaptive is None else str(self.adaptive),  # "kl:0.0005": ExitRule.parse reads it
            "adaptive_recur": self.adaptive_recur,
            "adaptive_results": {t: res.to_dict() for t, res in self.adaptive_results.items()},
            "depth_results": {t: res.to_dict() for t, res in self.depth_results.items()},
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
            adaptive=ExitRule.parse(d["adaptive"]) if d.get("adaptive") else None,
            adaptive_results={t: EvalResult(**res) for t, res in d.get("adaptive_results", {}).items()},
            recursive=bool(d.get("recursive", True)),
            task_names=dict(d.get("task_names", {})),
            too_long=dict(d.get("too_long", {})),
            seconds=dict(d.get("seconds", {})),
            model=dict(d.get("model", {})),
            checkpoint=d.get("checkpoint", ""),
            meta=dict(d.get("meta", {})),
            settings=dict(d.get("settings", {})),
            depth_results={t: EvalResult(**res) for t, res in d.get("depth_results", {}).items()},
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
                "recurrences per generated token actually used (the last prompt token, which yields the first "
                "generated token, exits by the same rule; the rest of the prompt runs all "
                f"{self.adaptive_recur}). Multiple-choice tasks are scored from one forward pass over "
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
                depth = self.depth_results.get(panel)
                if depth is not None:
                    ax.plot([depth.mean_recur], [depth.accuracy], marker="D", markersize=8, linestyle="none",
                            label="adaptive depth per problem")
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
