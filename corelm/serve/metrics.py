"""Prometheus metrics in the text exposition format, without a client library.

Counters and histograms are updated from the HTTP handlers and the batcher thread (a lock guards
them); gauges such as queue depth are read from callbacks when ``/metrics`` is scraped, so they are
never stale. Format: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

# Latency buckets in seconds: sub-millisecond decode steps up to multi-minute generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    """The server's counters, histograms and live gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}          # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.disconnects = 0
        self.latency = Histogram()      # request arrival -> last byte
        self.ttft = Histogram()         # request arrival -> first generated token
        self.tpot = Histogram()         # mean time per output token after the first
        self.queue_wait = Histogram()   # arrival -> admitted into the running batch
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help, read)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def count_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    def observe(self, histogram: Histogram, value: float) -> None:
        with self._lock:
            histogram.observe(value)

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines])

        with self._lock:
            metric("corelm_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [f"corelm_requests_total{_labels({'endpoint': e, 'status': str(s)})} {n}"
                    for (e, s), n in sorted(self.requests.items())])
            metric("corelm_prompt_tokens_total", "counter", "Prompt tokens processed.",
                   [f"corelm_prompt_tokens_total {self.prompt_tokens}"])
            metric("corelm_generation_tokens_total", "counter", "Tokens generated.",
                   [f"corelm_generation_tokens_total {self.generation_tokens}"])
            metric("corelm_client_disconnects_total", "counter",
                   "Requests abandoned by their client (slot freed).",
                   [f"corelm_client_disconnects_total {self.disconnects}"])
            for name, hist, help in (
                ("corelm_request_latency_seconds", self.latency, "Request latency, arrival to last byte."),
                ("corelm_time_to_first_token_seconds", self.ttft, "Arrival to first generated token."),
                ("corelm_time_per_output_token_seconds", self.tpot, "Mean time per output token after the first."),
                ("corelm_queue_wait_seconds", self.queue_wait, "Arrival to admission into the running batch."),
            ):
                metric(name, "histogram", help, hist.render(name))
        for name, (help, read) in self.gauges.items():
            metric(name, "gauge", help, [f"{name} {read():g}"])
        return "\n".join(out) + "\n"
