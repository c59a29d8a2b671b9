"""The local model process of ``fundus serve --workers N``: loads the model once, serves every API process.

Started (and restarted) by :class:`service.queue.supervisor.ModelProcessSupervisor`. It loads and
warms the weights on ``FUNDUS_DEVICE``, then serves jobs on a Unix socket through one micro-batcher
(:mod:`service.queue.ipc_server`), and exposes its batch metrics (``fundus_batch_size``,
``fundus_inference_duration_seconds``, ``fundus_queue_wait_seconds``) on its own ``/metrics`` port like
a ``fundus worker`` (``FUNDUS_WORKER_METRICS_PORT``/``_HOST``).

Signals: SIGINT is ignored (a Ctrl-C reaches the whole process group, and the API processes must
finish their requests first); SIGTERM drains: the socket stops accepting, the API processes'
connections are served until they close (each API process disconnects once its own requests are
answered) or ``FUNDUS_SHUTDOWN_TIMEOUT_S`` passes, then the batcher drains. The process also stops
when its parent (the supervisor) is gone, so a killed ``fundus serve`` never leaves it behind.

Heavy modules (torch, the model) are imported inside the entry point only: the spawned interpreter
imports this module first, and the thread settings must be applied before torch starts its pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Event
from typing import Any

log = logging.getLogger("fundus.model_process")

#: Exit status of a model process that could not load its model (the supervisor does not retry forever).
EXIT_STARTUP_FAILED = 3
#: How often the process checks that its parent is still alive.
PARENT_CHECK_S = 1.0


class BatchWatch:
    """Wraps the batch function to know whether a model pass is running, and since when.

    Readiness turns false while one pass has run longer than ``stuck_after_s`` (a hung device):
    load balancers then stop sending work while the supervisor's operator is alerted by the reason.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], list[Any]],
        stuck_after_s: float,
        on_start: Callable[[Sequence[Any]], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.stuck_after_s = stuck_after_s
        self._on_start = on_start
        self._started: float | None = None

    def __call__(self, jobs: Sequence[Any]) -> list[Any]:
        self._started = time.monotonic()
        if self._on_start is not None:
            self._on_start(jobs)
        try:
            return self._run_batch(jobs)
        finally:
            self._started = None

    def running_for(self) -> float:
        """Seconds the current model pass has run (0 when idle)."""
        started = self._started
        return 0.0 if started is None else time.monotonic() - started

    def stuck(self) -> bool:
        return self.running_for() > self.stuck_after_s


def run_model_process(
    socket_path: str, parent_pid: int, ready: Event, torch_threads: int, cv_threads: int
) -> None:
    """Entry point of the spawned model process (settings from the ``FUNDUS_*`` environment).

    Args:
        socket_path: where to listen.
        parent_pid: the supervisor; the process stops when it is gone.
        ready: set once the model is loaded, warm and the socket is listening.
        torch_threads / cv_threads: intra-op threads of torch and OpenCV here (the API processes run
            with fewer; this process must not inherit their budget).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The API processes' shared metrics folder (service.metrics.MULTIPROCESS_ENV) is theirs: this
    # process serves its own batch metrics, which must not be added to the API's. prometheus_client
    # reads the variable when first imported, which has not happened yet here.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import cv2
    import torch

    torch.set_num_threads(max(1, torch_threads))
    cv2.setNumThreads(max(1, cv_threads))

    from model.artifact import ArtifactError
    from service.logging import configure_logging
    from service.runner import DeviceSettingError, prepare_model_process
    from service.settings import load_settings

    settings = load_settings()
    prepare_model_process(settings)
    configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings, socket_path, parent_pid, ready))
    except (ArtifactError, DeviceSettingError, OSError) as exc:
        log.error("model process cannot start", extra={"error": str(exc)})
        sys.exit(EXIT_STARTUP_FAILED)


async def _serve(settings: Any, socket_path: str, parent_pid: int, ready: Event) -> None:
    from service.metrics import batch_histograms
    from service.queue.embedded import EmbeddedQueue
    from service.queue.ipc_server import ModelServer
    from service.runner import load_runner

    metrics = _ModelMetrics(batch_histograms)
    runner, artifact = load_runner(settings, on_batch=metrics.observe_batch)
    if settings.warmup:
        seconds = runner.warm_up((1,))
        log.info("warm-up done", extra={"seconds": round(seconds, 3)})
    watch = BatchWatch(
        runner.run_jobs, stuck_after_s=max(settings.request_timeout_s, 10.0), on_start=metrics.observe_waits
    )
    queue = EmbeddedQueue(
        watch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        on_batch_failure=metrics.batch_failures.inc,
    )
    await queue.start()

    async def readiness() -> tuple[bool, str]:
        if watch.stuck():
            return False, f"a model pass has been running for {watch.running_for():.0f} s"
        return await queue.readiness()

    server = ModelServer(queue, working_size=runner.working_size, readiness=readiness)
    await server.start(socket_path)
    metrics.serve(str(runner.device))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    orphan_check = asyncio.create_task(_stop_when_orphaned(parent_pid, stop))
    ready.set()
    log.info(
        "model process ready",
        extra={"pid": os.getpid(), "device": str(runner.device), "model_version": artifact.version},
    )
    await stop.wait()
    orphan_check.cancel()
    drain = settings.shutdown_timeout_s
    log.info("model process draining", extra={"connections": server.connections})
    started = time.monotonic()
    await server.close(drain)
    await queue.stop(max(0.0, drain - (time.monotonic() - started)))
    log.info("model process stopped")


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once the parent process is gone (this process was re-parented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_S)  # polling: no portable parent-death notification
    log.warning("the serving process is gone; stopping")
    stop.set()


class _ModelMetrics:
    """Batch metrics of the model process in a private registry, served on the worker metrics port."""

    def __init__(self, batch_histograms: Callable[[Any], tuple[Any, Any, Any]]) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_wait, self.batch_size, self.inference_duration = batch_histograms(self.registry)
        self.batch_failures = Counter(
            "fundus_batch_failures_total", "Model passes that raised", registry=self.registry
        )
        self._lock = threading.Lock()

    def observe_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.inference_duration.observe(seconds)

    def observe_waits(self, jobs: Sequence[Any]) -> None:
        """Queue wait of each job of a batch that starts now."""
        now = time.time()
        for job in jobs:
            self.queue_wait.observe(max(0.0, now - job.enqueued_at))

    def serve(self, device: str) -> None:
        """Expose ``/metrics`` as ``fundus worker`` does (automatic port unless configured; 0 = off)."""
        from prometheus_client import start_http_server

        from service.commands.worker import AUTO_PORT, METRICS_PORT_TRIES, metrics_port_for
        from service.worker import WorkerSettings

        worker_settings = WorkerSettings()
        port, host = worker_settings.worker_metrics_port, worker_settings.worker_metrics_host
        if not port:
            return
        candidates = range(metrics_port_for(device), metrics_port_for(device) + METRICS_PORT_TRIES)
        for candidate in candidates if port == AUTO_PORT else (port,):
            with contextlib.suppress(OSError):
                server, _thread = start_http_server(candidate, addr=host, registry=self.registry)
                log.info("model process metrics", extra={"port": server.server_port})
                return
        log.warning("model process metrics not served: no free port", extra={"port": port})
