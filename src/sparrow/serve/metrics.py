"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client).

Read from the engine's `EngineStats` and the per-status response counts when scraped (a
custom collector: nothing is registered globally, so several apps in one process keep apart):

    sparrow_http_responses_total{status}     responses sent, by HTTP status
    sparrow_requests_total{outcome}          generations: completed, cancelled, timed_out,
                                             failed, rejected (queue full)
    sparrow_prompt_tokens_total, sparrow_completion_tokens_total
    sparrow_target_calls_total               target forwards after the prefill
    sparrow_tau                              completion tokens per target call, all requests
    sparrow_prefill_seconds_total, sparrow_decode_seconds_total
    sparrow_queue_depth, sparrow_busy        requests waiting; 1 while one generates
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("completed", "cancelled", "timed_out", "failed", "rejected")


class ServerCollector:
    def __init__(self, engine, statuses: Counter):
        self.engine, self.statuses = engine, statuses

    def collect(self):
        stats = self.engine.stats
        responses = CounterMetricFamily("sparrow_http_responses", "responses sent, by HTTP status",
                                        labels=["status"])
        for status, count in sorted(self.statuses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        outcomes = CounterMetricFamily("sparrow_requests", "generations by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], getattr(stats, outcome))
        yield outcomes
        for name, value, text in (
                ("sparrow_prompt_tokens", stats.prompt_tokens, "prompt tokens of completed generations"),
                ("sparrow_completion_tokens", stats.completion_tokens, "tokens generated"),
                ("sparrow_target_calls", stats.target_calls, "target forwards after the prefill"),
                ("sparrow_prefill_seconds", stats.prefill_s, "seconds spent prefilling"),
                ("sparrow_decode_seconds", stats.decode_s, "seconds spent decoding")):
            yield CounterMetricFamily(name, text, value=value)
        tau = stats.completion_tokens / stats.target_calls if stats.target_calls else 0.0
        yield GaugeMetricFamily("sparrow_tau", "completion tokens per target call, all requests", value=tau)
        yield GaugeMetricFamily("sparrow_queue_depth", "requests waiting", value=self.engine.queued)
        yield GaugeMetricFamily("sparrow_busy", "1 while a generation runs", value=int(self.engine.busy))


def exposition(engine, statuses: Counter) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(engine, statuses))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StatusCounter:
    """ASGI middleware counting the HTTP status of every response into `statuses`."""

    def __init__(self, app, statuses: Counter):
        self.app, self.statuses = app, statuses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting(message):
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting)
