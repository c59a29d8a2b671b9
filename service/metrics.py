"""Prometheus metrics of the API process (names fixed by the design; no ids in labels).

Each app owns its own :class:`~prometheus_client.CollectorRegistry`, so several apps in one process
(tests) never collide. Buckets run from 1 ms to 60 s so GPU milliseconds and CPU seconds both resolve.

Several API processes (``fundus serve --workers N``) share one metrics folder
(:func:`share_across_processes`, prometheus_client's multiprocess mode): whichever process answers
a scrape reports the counters and histograms of all of them, and gauges as each one's mode says.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

#: prometheus_client's switch to its multiprocess mode; read when prometheus_client is imported.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_across_processes() -> str | None:
    """Point the processes started from now on at one private metrics folder (``MULTIPROCESS_ENV``).

    Call before the API processes are started. Returns the folder made here, for the caller to remove
    when they are gone, or None where the operator set the variable already (their folder, theirs
    to clean: it must be empty at start).
    """
    if os.environ.get(MULTIPROCESS_ENV):
        return None
    directory = tempfile.mkdtemp(prefix="fundus-metrics-")
    os.environ[MULTIPROCESS_ENV] = directory
    return directory


def shared_directory() -> str | None:
    """The metrics folder this process writes to, or None when its metrics are its own."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def forget_dead_processes(directory: str) -> None:
    """Drop the live gauges of API processes that are gone without saying so (killed, crashed).

    Their counters stay (totals never go back); a stale ``fundus_ready`` 0 or in-flight count would
    otherwise stay in every scrape until the server restarts.
    """
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # another process may be removing the same files
            mark_process_dead(int(pid), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


class _QueueDepth(Collector):
    """``fundus_queue_depth``, read from the queue backend at scrape time.

    A collector rather than a gauge: every API process sees the same queue, so its depth is reported
    as it is now, never summed over processes or kept in the metrics folder.
    """

    def __init__(self) -> None:
        self.depth: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("fundus_queue_depth", "Jobs waiting for the model", value=float(self.depth()))


LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

# Endpoint label values; anything else is folded into "other" to keep cardinality bounded.
ENDPOINTS = (
    "/enhance",
    "/segment",
    "/degrade",
    "/render",
    "/quality",
    "/model",
    "/healthz",
    "/readyz",
    "/metrics",
)


def endpoint_label(path: str) -> str:
    return path if path in ENDPOINTS else "other"


def batch_histograms(registry: CollectorRegistry) -> tuple[Histogram, Histogram, Histogram]:
    """Queue wait, batch size and batch model time: the same series in the API and in Redis workers,
    so one dashboard panel covers the embedded and the Redis deployment."""
    queue_wait = Histogram(
        "fundus_queue_wait_seconds",
        "Time a job waited between enqueue and its batch start",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    batch_size = Histogram(
        "fundus_batch_size", "Jobs per model pass", buckets=BATCH_SIZE_BUCKETS, registry=registry
    )
    inference_duration = Histogram(
        "fundus_inference_duration_seconds",
        "Model time of one batch (one observation per batch)",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return queue_wait, batch_size, inference_duration


class Metrics:
    """The service's collectors, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fundus_requests_total",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fundus_request_duration_seconds",
            "End-to-end request time",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait, self.batch_size, self.inference_duration = batch_histograms(r)
        self.queue_depth = _QueueDepth()
        r.register(self.queue_depth)
        self.rejected = Counter(
            "fundus_rejected_total", "Requests refused, by reason (error code)", ["reason"], registry=r
        )
        self.model_info = Gauge(
            "fundus_model_info",
            "Served weights (always 1)",
            ["version", "preset", "device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.preprocess_duration = Histogram(
            "fundus_preprocess_seconds",
            "Decode, FOV detection and resize time per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.postprocess_duration = Histogram(
            "fundus_postprocess_seconds",
            "Mapping back to the input geometry and encoding per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "fundus_inflight_requests", "Requests being handled now", registry=r, multiprocess_mode="livesum"
        )
        self.batch_failures = Counter(
            "fundus_batch_failures_total",
            "Model passes that raised (every job of the batch failed)",
            registry=r,
        )
        # Over several API processes: 1 only when every running one is ready.
        self.ready = Gauge(
            "fundus_ready", "1 when the service reports ready", registry=r, multiprocess_mode="livemin"
        )
        # Trust signals (see model/trust.py and model/quality.py).
        share = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
        self.quality_before = Histogram(
            "fundus_quality_before", "P(good) of photographs before enhancement", buckets=share, registry=r
        )
        self.quality_after = Histogram(
            "fundus_quality_after", "P(good) of enhanced photographs", buckets=share, registry=r
        )
        self.uncertainty = Histogram(
            "fundus_enhance_uncertainty",
            "Mean stage disagreement of an enhancement inside the FOV",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2),
            registry=r,
        )
        self.structure_dice = Histogram(
            "fundus_structure_dice", "Dice of the vessel maps of input and output", buckets=share, registry=r
        )
        self.structure_warnings = Counter(
            "fundus_structure_warnings_total",
            "Enhancements whose vessel map changed beyond FUNDUS_STRUCTURE_MIN_DICE",
            registry=r,
        )
        self.skipped_enhancements = Counter(
            "fundus_enhance_skipped_total",
            "only_if_needed requests answered with the input (already good)",
            registry=r,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the depth from the queue backend at scrape time."""
        self.queue_depth.depth = depth

    def set_model(self, version: str, preset: str, device: str) -> None:
        self.model_info.labels(version=version, preset=preset, device=device).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text format: this app's registry, or, with a shared folder, every API process's."""
        directory = shared_directory()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        forget_dead_processes(directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        registry.register(self.queue_depth)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @staticmethod
    def retire_process() -> None:
        """Drop this process's live gauges from the shared folder (it is stopping; no-op without one)."""
        directory = shared_directory()
        if directory is not None:
            mark_process_dead(os.getpid(), directory)
