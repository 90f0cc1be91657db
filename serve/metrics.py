"""Ray custom metrics per tier (exported as `ray_rnc_serve_*` on each node's metrics port, scraped by Prometheus).

Per tier replica, from its continuous-batching engine: running rows, waiting requests, KV blocks in use (and the pool
size), tokens/s and mean recurrences per token over the last few hundred ms as gauges; finished requests (by finish
reason), generated tokens and the recurrences spent on them as counters (their rates give tokens/s and mean r over
any window); time to first token as a histogram; tokens scored by full forwards (log-probabilities) and their
recurrences as counters. The ingress counts HTTP responses per tier and status.
"""

from __future__ import annotations

from ray.util import metrics

from .batcher import EngineSnapshot
from .generation import Completion

_FIRST_TOKEN_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0]


class TierMetrics:
    """`MetricsSink` of one tier replica's ReplicaBatcher (called where the engine loop's output arrives)."""

    def __init__(self, tier: str):
        tags = {"tier": tier}

        def gauge(name: str, description: str) -> metrics.Gauge:
            g = metrics.Gauge(name, description, tag_keys=("tier",))
            g.set_default_tags(tags)
            return g

        def counter(name: str, description: str) -> metrics.Counter:
            c = metrics.Counter(name, description, tag_keys=("tier",))
            c.set_default_tags(tags)
            return c

        self._running = gauge("rnc_serve_running_rows", "Sequences in the engine (prefilling or decoding).")
        self._waiting = gauge("rnc_serve_waiting_requests", "Requests queued for admission to the engine.")
        self._kv_used = gauge("rnc_serve_kv_blocks_used", "KV pool blocks held by sequences.")
        self._kv_total = gauge("rnc_serve_kv_blocks_total", "KV pool blocks of the replica.")
        self._tokens_per_s = gauge("rnc_serve_tokens_per_second", "Generated tokens per second, recent.")
        self._mean_recur = gauge(
            "rnc_serve_mean_recurrences_per_token", "Mean recurrences per generated token, recent."
        )
        self._tokens = counter("rnc_serve_generated_tokens", "Generated tokens of finished requests.")
        self._recurrences = counter(
            "rnc_serve_recurrences", "Recurrences spent on generated tokens (rate / token rate = mean r)."
        )
        self._scored = counter("rnc_serve_scored_tokens", "Tokens scored by full forwards (/v1/completions logprobs).")
        self._scored_recurrences = counter(
            "rnc_serve_scored_recurrences", "Recurrences of those forwards, per token (rate / scored rate = mean r)."
        )
        self._requests = metrics.Counter(
            "rnc_serve_requests", "Finished generation requests.", tag_keys=("tier", "finish_reason")
        )
        self._requests.set_default_tags(tags)
        self._first_token = metrics.Histogram(
            "rnc_serve_time_to_first_token_seconds",
            "Arrival at the replica to the first token (queue wait + prefill).",
            boundaries=_FIRST_TOKEN_BOUNDARIES,
            tag_keys=("tier",),
        )
        self._first_token.set_default_tags(tags)

    def engine_load(self, snapshot: EngineSnapshot, tokens_per_s: float, mean_recur: float) -> None:
        self._running.set(snapshot.running)
        self._waiting.set(snapshot.waiting)
        self._kv_used.set(snapshot.kv_blocks_used)
        self._kv_total.set(snapshot.kv_blocks_total)
        self._tokens_per_s.set(tokens_per_s)
        if tokens_per_s > 0:  # an idle replica keeps showing the r of its last tokens, not 0
            self._mean_recur.set(mean_recur)

    def request_finished(self, completion: Completion) -> None:
        self._requests.inc(1, tags={"finish_reason": completion.finish_reason})
        if completion.completion_tokens:
            self._tokens.inc(completion.completion_tokens)
            self._recurrences.inc(sum(completion.recurs))
            self._first_token.observe(completion.first_token_s)

    def tokens_scored(self, tokens: int, num_recur: int) -> None:
        self._scored.inc(tokens)
        self._scored_recurrences.inc(tokens * num_recur)


class IngressMetrics:
    """HTTP responses of the ingress by tier ('-' before routing) and status code."""

    def __init__(self) -> None:
        self._responses = metrics.Counter(
            "rnc_serve_http_responses", "HTTP responses of the completion endpoints.", tag_keys=("tier", "status")
        )

    def response(self, tier: str | None, status: int) -> None:
        self._responses.inc(1, tags={"tier": tier or "-", "status": str(status)})
