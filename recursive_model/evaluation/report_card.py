"""The files `rnc eval` writes: eval.json, eval.md, eval.png and the report card, and reading eval.json back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .report import ADAPTIVE, EvalReport, _describe_model, _fmt, _md_row

OUTPUT_FILES = {"json": "eval.json", "markdown": "eval.md", "plot": "eval.png", "report_card": "report_card.md"}


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
        rec, decode = cfg.get("recurrence"), cfg.get("decode")
        if cfg.get("n_recur", 0) > 0 and rec and decode:
            lines.append(
                f"- training recurrences: mean {rec['mean']}, max {rec['r_max']}, sigma {rec['sigma']}, "
                f"bptt_k {rec['bptt_k']}; default decode r {decode['num_recur']}"
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
    return lines + _difficulty_rows(report, r_max) + _depth_rows(report, r_max)


def _depth_rows(report: EvalReport, r_max: int) -> list[str]:
    """The exit rule per problem (evaluation.depth): how deep the whole forward goes before the answer settles."""
    if not report.depth_results:
        return []
    lines = [
        "",
        f"Adaptive depth per problem: one forward over each prompt, `{report.adaptive}` checked at the answer position "
        "after every recurrence, the whole prompt counted at the recurrence where it fires (above, the prompt runs "
        f"all {r_max} and only generated tokens can exit, so a one-token answer's work is not counted there):",
        "",
        _md_row(["task", "difficulty", "problems", f"accuracy r={r_max}", "accuracy at the exit", "recurrences"]),
        _md_row([":--", "--:", "--:", "--:", "--:", "--:"]),
    ]
    for task, depth in report.depth_results.items():
        fixed = report.results[task][r_max]
        lines.append(_md_row([task, "all", str(depth.total), _fmt(fixed.accuracy), _fmt(depth.accuracy),
                              _fmt(depth.mean_recur, 2)]))
        at_max = fixed.by_difficulty or {}
        for level, row in (depth.by_difficulty or {}).items():
            lines.append(_md_row([task, level, str(row["total"]), _fmt(at_max.get(level, {}).get("accuracy")),
                                  _fmt(row["accuracy"]), _fmt(row["mean_recur"], 2)]))
    return lines


def _difficulty_rows(report: EvalReport, r_max: int) -> list[str]:
    """The adaptive run per difficulty (hops, moves) of the tasks whose problems have one: do harder problems get
    more recurrences, and does the exit keep the accuracy of r_max on each?"""
    tasks = [t for t in report.tasks if report.adaptive_results[t].by_difficulty]
    if not tasks:
        return []
    lines = [
        "",
        "By difficulty (hops or moves per problem):",
        "",
        _md_row(["task", "difficulty", "problems", f"accuracy r={r_max}", "accuracy adaptive", "recurrences / token"]),
        _md_row([":--", "--:", "--:", "--:", "--:", "--:"]),
    ]
    for task in tasks:
        fixed = report.results[task][r_max].by_difficulty or {}
        for level, row in report.adaptive_results[task].by_difficulty.items():
            at_max = fixed.get(level, {}).get("accuracy")
            lines.append(_md_row([task, level, str(row["total"]), _fmt(at_max), _fmt(row["accuracy"]),
                                  _fmt(row["mean_recur"], 2)]))
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
