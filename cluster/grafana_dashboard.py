"""The custom metrics the code exports, and the Grafana dashboard that shows them (one panel per metric).

cluster/generate.py renders the dashboard into monitoring/rnc_grafana_dashboard.json and the monitoring ConfigMap;
tests/test_cluster.py checks the metric list against the source and the dashboard against the list.
"""

from __future__ import annotations

import json
from typing import Any

# ------------------------------------------------------------------------------------------------------ metrics
# Custom metrics the code exports through ray.util.metrics (pipelines/train_loop.py RaySession._export_metrics,
# pipelines/tune.py TuneSession, serve/metrics.py). Ray prefixes them with `ray_`; counters get `_total`.
# (exported name, type, labels, meaning); tests/test_cluster.py checks this list against the source.
TRAIN_METRICS = [
    ("ray_rnc_train_tokens_per_s", "gauge", "run, stage", "training throughput, all ranks together (tokens/s)"),
    ("ray_rnc_train_mfu", "gauge", "run, stage", "model FLOPs utilisation per device, a fraction (0.4 = 40%)"),
    ("ray_rnc_train_num_recur", "gauge", "run, stage", "recurrences r sampled for the latest logged step"),
    ("ray_rnc_train_loss", "gauge", "run, stage", "training loss of the latest logged step"),
    ("ray_rnc_train_lr", "gauge", "run, stage", "matrix learning rate of the latest logged step"),
    ("ray_rnc_train_step", "gauge", "run, stage", "optimizer steps done in the stage"),
    ("ray_rnc_val_bpb", "gauge", "run, stage, recur", "validation bits per byte at test-time r = recur"),
]
SERVE_METRICS = [
    ("ray_rnc_serve_generated_tokens_total", "counter", "tier", "generated tokens (rate = tokens/s)"),
    (
        "ray_rnc_serve_recurrences_total",
        "counter",
        "tier",
        "recurrences spent on generated tokens (rate / token rate = mean recurrences per token)",
    ),
    ("ray_rnc_serve_scored_tokens_total", "counter", "tier", "tokens scored by full forwards (completions logprobs)"),
    (
        "ray_rnc_serve_scored_recurrences_total",
        "counter",
        "tier",
        "recurrences of those forwards (rate / scored-token rate = mean r of scoring)",
    ),
    ("ray_rnc_serve_tokens_per_second", "gauge", "tier", "tokens/s of the replica's engine, recent"),
    ("ray_rnc_serve_mean_recurrences_per_token", "gauge", "tier", "mean r per generated token, recent"),
    ("ray_rnc_serve_running_rows", "gauge", "tier", "sequences in the replica's engine (per replica)"),
    ("ray_rnc_serve_waiting_requests", "gauge", "tier", "requests queued for admission (per replica)"),
    ("ray_rnc_serve_kv_blocks_used", "gauge", "tier", "KV pool blocks held by sequences (per replica)"),
    ("ray_rnc_serve_kv_blocks_total", "gauge", "tier", "KV pool blocks of a replica"),
    ("ray_rnc_serve_time_to_first_token_seconds", "histogram", "tier", "arrival at the replica to the first token"),
    ("ray_rnc_serve_requests_total", "counter", "tier, finish_reason", "finished generation requests"),
    ("ray_rnc_serve_http_responses_total", "counter", "tier, status", "HTTP responses of /v1/chat/completions"),
]


# ------------------------------------------------------------------------------------------------------ Grafana
def grafana_dashboard() -> str:
    """Our metrics, one panel each; Ray's own dashboards (default, train, serve) sit next to it in Grafana."""
    panels: list[dict[str, Any]] = []
    y = 0

    def row(title: str) -> None:
        nonlocal y
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        y += 1

    def panel(title: str, unit: str, description: str, *exprs: tuple[str, str]) -> None:
        nonlocal y
        n = sum(1 for p in panels if p["type"] == "timeseries")
        x = 0 if n % 2 == 0 else 12
        panels.append(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": "${datasource}",
                "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}},
                "targets": [
                    {"expr": e, "legendFormat": legend, "refId": chr(65 + i)} for i, (e, legend) in enumerate(exprs)
                ],
            }
        )
        if x == 12:
            y += 8

    run = 'run=~"$run"'
    row("Training (rank 0 of each stage; ray_rnc_train_*)")
    panel(
        "Tokens / s",
        "short",
        "All ranks together.",
        (f"sum by (run, stage) (ray_rnc_train_tokens_per_s{{{run}}})", "{{run}} {{stage}}"),
    )
    panel(
        "MFU",
        "percentunit",
        "Model FLOPs utilisation per device.",
        (f"max by (run, stage) (ray_rnc_train_mfu{{{run}}})", "{{run}} {{stage}}"),
    )
    panel(
        "Recurrences per step (sampled r)",
        "short",
        "r drawn for the latest logged step.",
        (f"max by (run, stage) (ray_rnc_train_num_recur{{{run}}})", "{{run}} {{stage}}"),
        (f"avg_over_time(max by (run, stage) (ray_rnc_train_num_recur{{{run}}})[$window:])", "mean {{run}} {{stage}}"),
    )
    panel(
        "Loss", "short", "Training loss.", (f"max by (run, stage) (ray_rnc_train_loss{{{run}}})", "{{run}} {{stage}}")
    )
    panel(
        "Validation bits per byte by test-time r",
        "short",
        "Lower is better; one line per r.",
        (f"max by (run, stage, recur) (ray_rnc_val_bpb{{{run}}})", "{{run}} {{stage}} r={{recur}}"),
    )
    panel(
        "Step and learning rate",
        "short",
        "Optimizer steps done; lr on the right axis.",
        (f"max by (run, stage) (ray_rnc_train_step{{{run}}})", "step {{run}} {{stage}}"),
        (f"max by (run, stage) (ray_rnc_train_lr{{{run}}})", "lr {{run}} {{stage}}"),
    )
    if len([p for p in panels if p["type"] == "timeseries"]) % 2:
        y += 8
    tier = 'tier=~"$tier"'
    row("Serving (per tier; ray_rnc_serve_*)")
    panel(
        "Generated tokens / s",
        "short",
        "Rate of the generated-token counter.",
        (f"sum by (tier) (rate(ray_rnc_serve_generated_tokens_total{{{tier}}}[$window]))", "{{tier}}"),
    )
    panel(
        "Mean recurrences per token",
        "short",
        "Recurrences spent / tokens generated over the window.",
        (
            f"sum by (tier) (rate(ray_rnc_serve_recurrences_total{{{tier}}}[$window])) / "
            f"sum by (tier) (rate(ray_rnc_serve_generated_tokens_total{{{tier}}}[$window]))",
            "{{tier}}",
        ),
    )
    panel(
        "Scored tokens / s and their mean r",
        "short",
        "Prompt tokens scored by full forwards (/v1/completions log-probabilities); mean r on the right.",
        (f"sum by (tier) (rate(ray_rnc_serve_scored_tokens_total{{{tier}}}[$window]))", "tokens/s {{tier}}"),
        (
            f"sum by (tier) (rate(ray_rnc_serve_scored_recurrences_total{{{tier}}}[$window])) / "
            f"sum by (tier) (rate(ray_rnc_serve_scored_tokens_total{{{tier}}}[$window]))",
            "mean r {{tier}}",
        ),
    )
    panel(
        "Running rows and waiting requests",
        "short",
        "Sequences in the engines and requests queued for admission, summed over replicas.",
        (f"sum by (tier) (ray_rnc_serve_running_rows{{{tier}}})", "running {{tier}}"),
        (f"sum by (tier) (ray_rnc_serve_waiting_requests{{{tier}}})", "waiting {{tier}}"),
    )
    panel(
        "Time to first token (p50, p95)",
        "s",
        "Arrival at the replica to the first token (queue wait + prefill).",
        (
            f"histogram_quantile(0.5, sum by (tier, le) (rate(ray_rnc_serve_time_to_first_token_seconds_bucket"
            f"{{{tier}}}[$window])))",
            "p50 {{tier}}",
        ),
        (
            f"histogram_quantile(0.95, sum by (tier, le) (rate(ray_rnc_serve_time_to_first_token_seconds_bucket"
            f"{{{tier}}}[$window])))",
            "p95 {{tier}}",
        ),
    )
    panel(
        "Requests / s by finish reason",
        "reqps",
        "Finished generation requests.",
        (
            f"sum by (tier, finish_reason) (rate(ray_rnc_serve_requests_total{{{tier}}}[$window]))",
            "{{tier}} {{finish_reason}}",
        ),
    )
    panel(
        "HTTP responses / s by status",
        "reqps",
        "Ingress responses; tier '-' = refused before routing.",
        ("sum by (tier, status) (rate(ray_rnc_serve_http_responses_total[$window]))", "{{tier}} {{status}}"),
    )
    panel(
        "KV blocks in use and engine tokens / s",
        "short",
        "KV pool blocks held / the pools' size, and the engines' recent tokens/s, summed over replicas.",
        (f"sum by (tier) (ray_rnc_serve_kv_blocks_used{{{tier}}})", "used {{tier}}"),
        (f"sum by (tier) (ray_rnc_serve_kv_blocks_total{{{tier}}})", "total {{tier}}"),
        (f"sum by (tier) (ray_rnc_serve_tokens_per_second{{{tier}}})", "tokens/s {{tier}}"),
    )
    panel(
        "Mean r per token, recent",
        "short",
        "Per replica, averaged.",
        (f"avg by (tier) (ray_rnc_serve_mean_recurrences_per_token{{{tier}}})", "{{tier}}"),
    )

    def query_var(name: str, metric: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": "query",
            "datasource": "${datasource}",
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "definition": f"label_values({metric}, {name})",
            "query": {"query": f"label_values({metric}, {name})", "refId": "StandardVariableQuery"},
        }

    dashboard = {
        "title": "recursive-nanochat",
        "uid": "rnc-recursive-nanochat",
        "tags": ["ray", "rnc"],
        "schemaVersion": 27,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "current": {"selected": False},
                },
                {
                    "name": "window",
                    "type": "interval",
                    "query": "30s,1m,5m,15m",
                    "auto": False,
                    "current": {"selected": True, "text": "1m", "value": "1m"},
                },
                query_var("run", "ray_rnc_train_step"),
                query_var("tier", "ray_rnc_serve_running_rows"),
            ]
        },
        "panels": panels,
    }
    return json.dumps(dashboard, indent=2) + "\n"
