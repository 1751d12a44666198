"""Prometheus metrics through an explicit registry, correct with several gunicorn workers.

With `PROMETHEUS_MULTIPROC_DIR` set (`onnxfn serve` sets it before any worker starts), every worker
writes its samples to files there and `scrape()` merges them; without it, `scrape()` reads the
registry the metrics were created in.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The function server's metrics, labelled by function."""

    def __init__(self, function: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.function = function
        self._requests = Counter(
            "onnxfn_requests",
            "HTTP requests by function, route and status",
            ["function", "route", "status"],
            registry=r,
        )
        self._events = Counter(
            "onnxfn_events",
            "CloudEvents handled by function and outcome",
            ["function", "outcome"],
            registry=r,
        )
        latency = Histogram(
            "onnxfn_request_seconds",
            "End-to-end request latency in the server",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        queue = Histogram(
            "onnxfn_queue_seconds",
            "Time the longest-waiting item of each model run waited for it",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        compute = Histogram(
            "onnxfn_compute_seconds",
            "Model run time per batch",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        batch = Histogram("onnxfn_batch_size", "Rows per model run", ["function"], buckets=BATCH_BUCKETS, registry=r)
        inflight = Gauge(
            "onnxfn_inflight_requests",
            "Requests being handled",
            ["function"],
            registry=r,
            multiprocess_mode="livesum",
        )
        load = Histogram(
            "onnxfn_model_load_seconds",
            "Model load time per worker",
            ["function"],
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        warmup = Histogram(
            "onnxfn_model_warmup_seconds",
            "Warm-up time per worker",
            ["function"],
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        startup = Histogram(
            "onnxfn_startup_seconds",
            "Server process start to this worker's readiness: the pod's share of a cold start",
            ["function"],
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.startup = startup.labels(function)
        engine_workers = Histogram(
            "onnxfn_engine_batch_workers",
            "HTTP workers whose items shared one model run of the shared engine",
            ["function"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.engine_batch_workers = engine_workers.labels(function)
        self.latency = latency.labels(function)
        self.queue = queue.labels(function)
        self.compute = compute.labels(function)
        self.batch_size = batch.labels(function)
        self.inflight = inflight.labels(function)
        self.model_load = load.labels(function)
        self.warmup = warmup.labels(function)

    def request(self, route: str, status: int) -> None:
        self._requests.labels(self.function, route, str(status)).inc()

    def events(self, outcome: str, count: int = 1) -> None:
        self._events.labels(self.function, outcome).inc(count)

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self.batch_size.observe(rows)
        self.compute.observe(compute_seconds)
        if queue_seconds:  # one sample a run (its oldest item), not one an item: cheap at 64 rows
            self.queue.observe(max(queue_seconds))

    def scrape(self) -> tuple[bytes, str]:
        """Exposition text of every worker's samples, and its content type."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
