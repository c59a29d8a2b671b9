"""``fundus worker``: load the weights on one device and consume the Redis request stream.

Settings come from ``FUNDUS_*`` (see :class:`service.worker.WorkerSettings`); the flags override
them. Exit status: 0 after SIGTERM/SIGINT (current batch finished), 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fundus.worker")

# flag name → settings field
_OVERRIDES = {
    "redis_url": "redis_url",
    "weights": "weights",
    "device": "device",
    "name": "worker_name",
    "metrics_port": "worker_metrics_port",
    "max_batch_size": "max_batch_size",
    "max_batch_wait_ms": "max_batch_wait_ms",
    "claim_idle_s": "redis_claim_idle_s",
    "max_deliveries": "redis_max_deliveries",
    "stream_prefix": "redis_stream_prefix",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a model worker that batches jobs from the Redis queue (FUNDUS_REDIS_URL)",
        description="Consume the Redis request stream in micro-batches on one device. "
        "Flags override the FUNDUS_* environment.",
    )
    parser.add_argument("--redis-url", help="redis:// or rediss:// URL (FUNDUS_REDIS_URL)")
    parser.add_argument("--weights", help="weight artifact (FUNDUS_WEIGHTS)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (FUNDUS_DEVICE)")
    parser.add_argument("--name", help="consumer name, unique per live worker (FUNDUS_WORKER_NAME)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="/metrics port; -1 = 9101 + GPU index or the next free, 0 = off (FUNDUS_WORKER_METRICS_PORT)",
    )
    parser.add_argument("--max-batch-size", type=int, help="FUNDUS_MAX_BATCH_SIZE")
    parser.add_argument("--max-batch-wait-ms", type=float, help="FUNDUS_MAX_BATCH_WAIT_MS")
    parser.add_argument(
        "--claim-idle-s", type=float, help="reclaim entries idle this long (FUNDUS_REDIS_CLAIM_IDLE_S)"
    )
    parser.add_argument(
        "--max-deliveries", type=int, help="dead-letter after this many (FUNDUS_REDIS_MAX_DELIVERIES)"
    )
    parser.add_argument("--stream-prefix", help="Redis key prefix (FUNDUS_REDIS_STREAM_PREFIX)")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """``WorkerSettings`` from the environment with the given flags applied on top."""
    from service.worker import WorkerSettings

    overrides = {
        field: getattr(args, flag)
        for flag, field in _OVERRIDES.items()
        if getattr(args, flag, None) is not None
    }
    return WorkerSettings(**overrides)


def build_worker(
    settings: Any,
    *,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
) -> Any:
    """Load the artifact, warm the model up and return a ready :class:`service.worker.Worker`.

    ``wrap`` decorates the batch function (used by tests to inject slowness or crashes).
    """
    from service.runner import load_runner
    from service.worker import worker_from_settings

    runner, artifact = load_runner(settings)
    if settings.warmup:
        runner.warm_up((1,))
    run_batch = runner.run_jobs if wrap is None else wrap(runner.run_jobs)
    device = str(runner.device)
    return worker_from_settings(settings, run_batch, device=device, model_version=artifact.version)


#: Base port of worker metrics: worker on GPU N takes 9101 + N; automatic ports try this many more.
AUTO_PORT = -1
METRICS_BASE_PORT = 9101
METRICS_PORT_TRIES = 32


def metrics_port_for(device: str) -> int:
    """9101 + the CUDA device index (``cuda:2`` → 9103); 9101 for the CPU and plain ``cuda``."""
    _, _, index = device.partition(":")
    return METRICS_BASE_PORT + (int(index) if index.isdigit() else 0)


def serve_metrics(worker: Any, port: int, host: str) -> Any:
    """Serve the worker's ``/metrics``: on ``port``, or (``port`` = -1) on the device's port or the
    next free one above it, so several workers on one host never collide. Returns the server."""
    if port != AUTO_PORT:
        return worker.metrics.serve(port, host)
    first = metrics_port_for(str(worker.device))
    for candidate in range(first, first + METRICS_PORT_TRIES):
        try:
            return worker.metrics.serve(candidate, host)
        except OSError:
            continue
    return worker.metrics.serve(0, host)  # any free port, logged


def serve(settings: Any, *, wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> int:
    """Build, expose metrics, install signal handlers and run until SIGTERM; the process exit status."""
    from model.artifact import ArtifactError
    from service.logging import configure_logging

    configure_logging(settings.log_level)
    if not settings.redis_url:
        print("error: FUNDUS_REDIS_URL (or --redis-url) is required for a worker", file=sys.stderr)  # noqa: T201
        return 2
    try:
        worker = build_worker(settings, wrap=wrap)
    except (ArtifactError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if settings.worker_metrics_port:
        try:
            server = serve_metrics(worker, settings.worker_metrics_port, settings.worker_metrics_host)
        except OSError as exc:
            message = f"error: cannot serve metrics on port {settings.worker_metrics_port}: {exc}"
            print(message, file=sys.stderr)  # noqa: T201
            return 2
        log.info("worker metrics", extra={"port": server.server_port})
    worker.install_signal_handlers()
    worker.run()
    return 0


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    from service.runner import prepare_model_process

    prepare_model_process(settings)
    return serve(settings)
