"""The platform's own Prometheus metrics: cold starts (total and parts), replicas, queue depth.

A cold start is timed from "a request arrived for a revision with no process" to "its reply was
sent"; its parts come from the started process's readiness timings:

    process_start    spawn -> the function's pipeline started (interpreter, imports, gunicorn fork)
    model_load       onnxruntime session and model load (the function's own timing)
    warmup           the function's warm-up runs
    ready_detect     function ready -> the activator's readiness probe saw it
    first_inference  request forwarded -> reply sent (the first request itself)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

COLD_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
PART_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
PARTS = ("process_start", "model_load", "warmup", "ready_detect", "first_inference")
# (service, revision, ready processes, starting processes, waiting requests, in-flight, traffic %)
RevisionRow = tuple[str, str, int, int, int, int, int]


class _RevisionGauges(Collector):
    """Gauges read from the live platform state at scrape time."""

    def __init__(self, rows: Callable[[], Iterable[RevisionRow]]) -> None:
        self.rows = rows

    def collect(self) -> Iterator[Any]:
        labels = ["service", "revision"]
        families = {
            "replicas": GaugeMetricFamily("onnxfn_platform_replicas", "Ready processes per revision", labels=labels),
            "starting": GaugeMetricFamily("onnxfn_platform_starting", "Processes starting per revision", labels=labels),
            "queue": GaugeMetricFamily(
                "onnxfn_platform_queue_depth", "Requests waiting for a process per revision", labels=labels
            ),
            "inflight": GaugeMetricFamily(
                "onnxfn_platform_inflight", "Requests forwarded and not answered per revision", labels=labels
            ),
            "traffic": GaugeMetricFamily(
                "onnxfn_platform_traffic_percent", "Share of the Service URL's traffic", labels=labels
            ),
        }
        for service, revision, ready, starting, waiting, inflight, percent in self.rows():
            for key, value in (
                ("replicas", ready),
                ("starting", starting),
                ("queue", waiting),
                ("inflight", inflight),
                ("traffic", percent),
            ):
                families[key].add_metric([service, revision], value)
        yield from families.values()

    def describe(self) -> Iterator[Any]:
        return iter(())


class PlatformMetrics:
    """Cold-start histograms, request counts, and live per-revision gauges."""

    def __init__(self, rows: Callable[[], Iterable[RevisionRow]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cold_start = Histogram(
            "onnxfn_platform_cold_start_seconds",
            "Request arrived at a revision with no process -> reply sent",
            ["service", "revision"],
            buckets=COLD_BUCKETS,
            registry=r,
        )
        self.cold_start_part = Histogram(
            "onnxfn_platform_cold_start_part_seconds",
            "Parts of a cold start: " + ", ".join(PARTS),
            ["service", "revision", "part"],
            buckets=PART_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "onnxfn_platform_requests",
            "Requests through the activator by revision and status",
            ["service", "revision", "status"],
            registry=r,
        )
        self.starts = Counter(
            "onnxfn_platform_process_starts",
            "Processes started by revision and outcome",
            ["service", "revision", "outcome"],
            registry=r,
        )
        r.register(_RevisionGauges(rows))

    def observe_cold_start(self, service: str, revision: str, total: float, parts: dict[str, float]) -> None:
        self.cold_start.labels(service, revision).observe(total)
        for part, seconds in parts.items():
            self.cold_start_part.labels(service, revision, part).observe(max(0.0, seconds))

    def scrape(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
