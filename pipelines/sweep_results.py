"""Sweep results: one row per trial, ranking, the results table (markdown, JSON), the objective plot, the best config.

Kept apart from sweep.py (the sweep file: space, objective, scheduler, validation) because it runs after the trials,
on what Tune stored, and is what `rnc tune` writes to `<storage>/<sweep>/results/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .config import PipelineConfig
from .sweep import SweepSpec


@dataclass
class TrialRow:
    """One trial in the results table."""

    trial_id: str
    status: str  # TERMINATED | ERROR | PENDING | RUNNING
    params: dict[str, Any]
    objective: float | None
    val_bpb: dict[int, float]  # r -> last reported val_bpb
    bpb_gain: float | None  # bpb at the smallest r minus at the largest
    steps: int  # trial steps trained (summed over the chain)
    total_steps: int
    reports: int  # Tune results (eval steps) this trial sent
    checkpoint: str | None  # URI of the final checkpoint of the last trained stage
    error: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.status != "ERROR" and self.steps < self.total_steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["val_bpb"] = {str(r): v for r, v in self.val_bpb.items()}
        d["stopped_early"] = self.stopped_early
        return d


def rank_rows(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first: trials that trained to the end by objective, then the stopped and failed ones."""
    def key(r: TrialRow) -> tuple[int, float]:
        done = r.status == "TERMINATED" and not r.stopped_early and r.objective is not None
        return (0 if done else 1 if r.objective is not None else 2, r.objective if r.objective is not None else 0.0)

    return sorted(rows, key=key)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The best trial that trained to the end; None when none did."""
    ranked = rank_rows(rows)
    if ranked and ranked[0].status == "TERMINATED" and not ranked[0].stopped_early and ranked[0].objective is not None:
        return ranked[0]
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def results_markdown(spec: SweepSpec, rows: list[TrialRow]) -> str:
    """The results table, best first."""
    rs = spec.objective.recurrences
    head = ["#", "trial", *spec.space, f"objective ({spec.objective.combine})", *(f"bpb@r{r}" for r in rs),
            "gain r" + f"{min(rs)}→{max(rs)}", "steps", "stopped early", "status"]
    lines = [f"Sweep `{spec.name}`: {len(rows)} trials, stage {'→'.join(spec.stages)}, objective = "
             f"{spec.objective.combine} of val bpb at r={rs} (lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rank_rows(rows), 1):
        cells = [str(i), r.trial_id, *(_fmt(r.params.get(p)) for p in spec.space), _fmt(r.objective),
                 *(_fmt(r.val_bpb.get(x)) for x in rs), _fmt(r.bpb_gain), f"{r.steps}/{r.total_steps}",
                 "yes" if r.stopped_early else "no", r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_json(spec: SweepSpec, rows: list[TrialRow]) -> str:
    best = best_row(rows)
    return json.dumps({"sweep": spec.name, "stages": spec.stages, "objective": spec.objective.to_dict(),
                       "best_trial": best.trial_id if best else None,
                       "trials": [r.to_dict() for r in rank_rows(rows)]}, indent=2) + "\n"


def plot_objective(spec: SweepSpec, rows: list[TrialRow], path: str | os.PathLike) -> None:
    """A PNG with one panel per swept field: objective vs value; hollow markers for trials stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(spec.space.values())
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    scored = [r for r in rows if r.objective is not None]
    for ax, dim in zip(axes[0], dims, strict=True):
        xs = [r.params.get(dim.path) for r in scored]
        categorical = any(not isinstance(x, int | float) or isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs}) if categorical else []
        for r, x in zip(scored, xs, strict=True):
            xv = labels.index(str(x)) if categorical else x
            full = not r.stopped_early
            ax.scatter([xv], [r.objective], s=42, marker="o", facecolors="tab:blue" if full else "none",
                       edgecolors="tab:blue" if full else "tab:red")
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif dim.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(dim.path)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"objective: {spec.objective.combine} bpb @ r={spec.objective.recurrences}")
    fig.suptitle(f"{spec.name}: filled = trained to the end, hollow red = stopped early (lower is better)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_config(spec: SweepSpec, row: TrialRow) -> PipelineConfig:
    """The best trial's pipeline config, named `<sweep>-best`: `rnc pipeline run --config` takes its YAML."""
    return spec.candidate_config(row.params, run_name=f"{spec.name}-best")
