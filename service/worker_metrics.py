"""Prometheus metrics of a ``fundus worker`` process, served on its own port.

The batch histograms keep the API's names (``fundus_batch_size``, ``fundus_inference_duration_seconds``,
``fundus_queue_wait_seconds``) so one dashboard panel covers the embedded and the Redis deployment;
the stream health series are worker-only (``fundus_worker_*``). No request ids in labels.
Each :class:`WorkerMetrics` owns a private registry, so several workers can live in one test process.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from service.metrics import batch_histograms

# Outcomes of a job taken from the stream (label values of fundus_worker_jobs_total).
OUTCOMES = ("ok", "expired", "failed", "dead_letter", "malformed")


class WorkerMetrics:
    """The worker's collectors in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_wait, self.batch_size, self.inference_duration = batch_histograms(r)
        self.jobs = Counter(
            "fundus_worker_jobs_total",
            "Jobs taken from the request stream, by outcome",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome=outcome)
        self.pending = Gauge(
            "fundus_worker_pending_entries",
            "Entries delivered to some worker and not yet acknowledged",
            registry=r,
        )
        self.stream_length = Gauge(
            "fundus_worker_stream_entries", "Entries in the request stream (waiting + running)", registry=r
        )
        self.oldest_pending_age = Gauge(
            "fundus_worker_oldest_pending_age_seconds", "Age of the oldest unacknowledged entry", registry=r
        )
        self.reclaimed = Counter(
            "fundus_worker_reclaimed_total", "Entries claimed from idle (presumed dead) consumers", registry=r
        )
        self.dead_lettered = Counter(
            "fundus_worker_dead_lettered_total", "Entries moved to the dead-letter stream", registry=r
        )
        self.redis_errors = Counter(
            "fundus_worker_redis_errors_total", "Failed Redis round trips (connection or timeout)", registry=r
        )
        self.busy = Gauge("fundus_worker_busy", "1 while a batch is being run", registry=r)
        self.up = Gauge("fundus_worker_redis_up", "1 when the last Redis round trip succeeded", registry=r)

    def observe_batch(self, size: int, seconds: float, waits: list[float]) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)
        for wait in waits:
            self.queue_wait.observe(max(0.0, wait))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> WSGIServer:
        """Expose ``/metrics`` on ``host:port`` from a daemon thread; ``port`` 0 picks a free port.

        Returns the server: ``server.server_port`` is the bound port, ``server.shutdown()`` stops it.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
