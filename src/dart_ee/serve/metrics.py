"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app (two apps in one
process, as in the tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dart_ee.serve.batcher import Observer

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds: early exit moves answers between the millisecond buckets, so they are fine at the low end
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2)


class ServeMetrics(Observer):
    """Requests by status, latency per exit, batch fill, queue depth and exits per stage."""

    def __init__(self, max_batch: int) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dart_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.latency = Histogram("dart_request_latency_seconds", "Request latency from arrival to answer, by the "
                                 "latest exit its samples took", ["exit"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("dart_sample_compute_seconds", "Time from a batch's start until a sample left, by "
                                 "exit", ["exit"], buckets=LATENCY_BUCKETS, registry=r)
        fills = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch} & set(range(1, max_batch + 1)))
        self.batch_size = Histogram("dart_batch_samples", "Samples per batch run", buckets=fills, registry=r)
        self.batch_fill = Histogram("dart_batch_fill_ratio", "Samples per batch over max_batch",
                                    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.exits = Counter("dart_exits", "Samples that left at each exit (0-based; the last is the full network)",
                             ["exit"], registry=r)
        self.depth = Gauge("dart_queue_samples", "Samples waiting for a batch", registry=r)
        self.max_batch = max_batch

    def batch(self, samples: int) -> None:
        self.batch_size.observe(samples)
        self.batch_fill.observe(samples / self.max_batch)

    def queued(self, samples: int) -> None:
        self.depth.set(samples)

    def left(self, exit_index: int, samples: int, seconds: float) -> None:
        self.exits.labels(str(exit_index)).inc(samples)
        self.compute.labels(str(exit_index)).observe(seconds)

    def answered(self, status: int, exit_index: int | None = None, seconds: float | None = None) -> None:
        self.requests.labels(str(status)).inc()
        if exit_index is not None and seconds is not None:
            self.latency.labels(str(exit_index)).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
