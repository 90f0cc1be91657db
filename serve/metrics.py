"""Ray custom metrics per tier (exported as `ray_rnc_serve_*` on each node's metrics port, scraped by Prometheus).

Per tier: requests (by finish reason), generated tokens and the recurrences spent on them (their rates give tokens/s
and mean recurrences per token over any window), tokens/s and mean r of the latest batch / request as gauges,
queue length, and the time requests wait for a batch. The ingress counts HTTP responses per tier and status.
"""

from __future__ import annotations

from ray.util import metrics

from .engine_adapter import Completion

_WAIT_BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]


class TierMetrics:
    """`MetricsSink` of one tier replica's BatchingEngine."""

    def __init__(self, tier: str):
        tags = {"tier": tier}
        self._requests = metrics.Counter(
            "rnc_serve_requests", "Finished generation requests.", tag_keys=("tier", "finish_reason")
        )
        self._requests.set_default_tags(tags)
        self._tokens = metrics.Counter("rnc_serve_generated_tokens", "Generated tokens.", tag_keys=("tier",))
        self._recurrences = metrics.Counter(
            "rnc_serve_recurrences",
            "Recurrences spent on generated tokens (rate / token rate = mean r).",
            tag_keys=("tier",),
        )
        self._tokens_per_s = metrics.Gauge(
            "rnc_serve_tokens_per_second", "Generated tokens per second of the latest batch.", tag_keys=("tier",)
        )
        self._mean_recur = metrics.Gauge(
            "rnc_serve_mean_recurrences_per_token",
            "Mean recurrences per token of the latest request.",
            tag_keys=("tier",),
        )
        self._queue = metrics.Gauge("rnc_serve_queue_length", "Requests waiting for a batch.", tag_keys=("tier",))
        self._batch_size = metrics.Gauge("rnc_serve_batch_size", "Requests in the latest batch.", tag_keys=("tier",))
        self._wait = metrics.Histogram(
            "rnc_serve_queue_wait_seconds",
            "Time from arrival to the start of the request's batch.",
            boundaries=_WAIT_BOUNDARIES,
            tag_keys=("tier",),
        )
        for m in (
            self._tokens,
            self._recurrences,
            self._tokens_per_s,
            self._mean_recur,
            self._queue,
            self._batch_size,
            self._wait,
        ):
            m.set_default_tags(tags)

    def queue_length(self, n: int) -> None:
        self._queue.set(n)

    def batch_finished(self, size: int, tokens: int, seconds: float) -> None:
        self._batch_size.set(size)
        if seconds > 0:
            self._tokens_per_s.set(tokens / seconds)

    def request_finished(self, completion: Completion) -> None:
        self._requests.inc(1, tags={"finish_reason": completion.finish_reason})
        if completion.completion_tokens:
            self._tokens.inc(completion.completion_tokens)
            self._recurrences.inc(sum(completion.recurs))
            self._mean_recur.set(completion.mean_recur)
        self._wait.observe(completion.queue_s)


class IngressMetrics:
    """HTTP responses of the ingress by tier ('-' before routing) and status code."""

    def __init__(self) -> None:
        self._responses = metrics.Counter(
            "rnc_serve_http_responses", "HTTP responses of /v1/chat/completions.", tag_keys=("tier", "status")
        )

    def response(self, tier: str | None, status: int) -> None:
        self._responses.inc(1, tags={"tier": tier or "-", "status": str(status)})
