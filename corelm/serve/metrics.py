"""Prometheus metrics through ``prometheus-client``, one registry per server.

Counters and histograms are updated from the HTTP handlers and the batcher thread (the client
library is thread-safe); gauges such as queue depth are read from callbacks when ``/metrics`` is
scraped, so they are never stale. A registry per app (not the library's global one) keeps servers
in one process -- tests, several models -- from sharing or clashing on metric names.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets in seconds: sub-millisecond decode steps up to multi-minute generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The current HTTP request's token counts, when the access log (corelm.serve.accesslog) records them: set per
# request by its middleware, added to by count_tokens (a stream's body runs in a task that inherits the context).
REQUEST: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("corelm_request", default=None)


class Metrics:
    """The server's counters, histograms and live gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("corelm_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("corelm_errors", "Error responses by OpenAI error code (or type).", ["code"], registry=r)
        self.prompt_tokens = Counter("corelm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("corelm_generation_tokens", "Tokens generated.", registry=r)
        self.disconnects = Counter("corelm_client_disconnects", "Requests abandoned by their client (slot freed).",
                                   registry=r)

        def histogram(name: str, help: str) -> Histogram:
            return Histogram(name, help, buckets=LATENCY_BUCKETS, registry=r)

        self.latency = histogram("corelm_request_latency_seconds", "Request latency, arrival to last byte.")
        self.ttft = histogram("corelm_time_to_first_token_seconds", "Arrival to first generated token.")
        self.tpot = histogram("corelm_time_per_output_token_seconds", "Mean time per output token after the first.")
        self.queue_wait = histogram("corelm_queue_wait_seconds", "Arrival to admission into the running batch.")

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at scrape time."""
        Gauge(name, help, registry=self.registry).set_function(read)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def count_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def count_tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        entry = REQUEST.get()
        if entry is not None:
            entry["prompt_tokens"] += prompt
            entry["completion_tokens"] += generated

    def count_disconnect(self) -> None:
        self.disconnects.inc()

    def observe(self, histogram: Histogram, value: float) -> None:
        histogram.observe(value)

    def render(self) -> str:
        """The text exposition format (``# HELP``/``# TYPE`` and samples)."""
        return generate_latest(self.registry).decode()
