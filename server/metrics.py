"""Prometheus metrics: one private ``CollectorRegistry`` per server, served over HTTP.

Names (all prefixed ``visionserve_``):

- ``requests_total{method}``, ``request_failures_total{method,code}``,
  ``requests_in_flight{method}``, ``request_seconds{method}``: every gRPC method except
  health checks and reflection, counted by ``interceptors.MetricsInterceptor``.
- ``queue_seconds{model}``, ``compute_seconds{model}``, ``batch_size{model}``,
  ``inference_rows_total{model}``: measured by each model's dynamic batcher.
- ``shed_total{model,reason}``: requests refused before any work was spent on them
  (``model`` empty for the server-wide reasons ``streams``, ``draining`` and ``loop``).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ModelMetrics:
    """The batcher's observer for one model (``batcher.BatchObserver``)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._queue = metrics.queue_seconds.labels(model)
        self._compute = metrics.compute_seconds.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._rows = metrics.inference_rows.labels(model)
        self._shed = {
            reason: metrics.shed.labels(model, reason) for reason in ("capacity", "deadline", "queue")
        }

    def on_queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def on_shed(self, reason: str) -> None:
        self._shed[reason].inc()

    def on_batch(self, size: int, seconds: float) -> None:
        self._compute.observe(seconds)
        self._batch.observe(size)
        self._rows.inc(size)


class Metrics:
    """Every metric of one server, in its own registry (several servers per process work)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "visionserve_requests", "gRPC requests received", ["method"], registry=r
        )
        self.failures = Counter(
            "visionserve_request_failures",
            "gRPC requests that failed, by status code",
            ["method", "code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "visionserve_requests_in_flight", "gRPC requests being handled", ["method"], registry=r
        )
        self.latency = Histogram(
            "visionserve_request_seconds",
            "gRPC request handling time",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "visionserve_queue_seconds",
            "time a request waited in the batcher queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "visionserve_compute_seconds",
            "backend time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "visionserve_batch_size",
            "rows per batch sent to the backend",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference_rows = Counter(
            "visionserve_inference_rows", "images (tensor rows) inferred", ["model"], registry=r
        )
        self.shed = Counter(
            "visionserve_shed",
            "requests refused before any work was spent on them, by reason: capacity "
            "(admission limit), deadline (cannot be met), queue (batcher queue full), "
            "streams (--max-streams), draining (shutting down), loop (the event loop "
            "behind, --max-loop-lag-ms)",
            ["model", "reason"],
            registry=r,
        )
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (0: a free port); returns the bound port."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"could not bind the metrics port {host}:{port}: {exc}") from exc
        bound = int(self._http.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
