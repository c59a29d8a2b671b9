"""``fundus serve``: the HTTP API under uvicorn (embedded queue unless ``FUNDUS_REDIS_URL`` is set).

Process layout:

* ``--workers 1`` (default): one process; the model runs in it behind the embedded micro-batcher.
* ``--workers N`` (N > 1, no Redis): N uvicorn API processes share the listening socket and do the
  CPU-side image work (decode, FOV, crop, map back, encode) in parallel; ONE model process, started
  and restarted by this process (:class:`service.queue.supervisor.ModelProcessSupervisor`), batches
  the jobs of all of them over a Unix socket (:mod:`service.queue.ipc_backend`). The model is loaded
  once, so N can follow the CPU count without multiplying model memory.
* with ``FUNDUS_REDIS_URL``: N API processes, the model in ``fundus worker`` processes.

Command-line flags override the matching ``FUNDUS_*`` variables (they are written back to the
environment so the spawned processes, which build their settings from the environment, see the same
values). On SIGTERM uvicorn drains its API processes first; the model process is stopped after them,
so requests in flight are answered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.queue.supervisor import ModelProcessSupervisor
    from service.settings import Settings

#: Seconds an API process may leave uvicorn's liveness ping unanswered before it is killed and
#: replaced. Its answering thread needs the GIL, which importing torch and loading the quality grader
#: hold for seconds at a time on a slow or CPU-throttled host; at uvicorn's default of 5 s such
#: processes were killed during start-up and replaced, over and over.
API_PROCESS_HEALTHCHECK_S = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the HTTP API (FastAPI + uvicorn)")
    parser.add_argument("--host", help="bind address (FUNDUS_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="bind port (FUNDUS_PORT, default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        help="API processes (FUNDUS_WORKERS, default 1); with more than one they share one model process",
    )
    parser.add_argument("--weights", help="weight artifact (FUNDUS_WEIGHTS, default the bundled teacher)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (FUNDUS_DEVICE)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from model.artifact import ArtifactError, read_metadata
    from service.commands.flags import settings_with_flags
    from service.logging import configure_logging
    from service.metrics import share_across_processes
    from service.runner import prepare_model_process

    overrides = {
        "HOST": args.host,
        "PORT": args.port,
        "WORKERS": args.workers,
        "WEIGHTS": args.weights,
        "DEVICE": args.device,
    }
    settings = settings_with_flags(overrides)
    if settings is None:
        return 2
    try:
        read_metadata(settings.weights)  # fail fast, before uvicorn forks, with a one-line reason
    except ArtifactError as exc:
        print(f"error: cannot serve: {exc} (set FUNDUS_WEIGHTS or --weights)", file=sys.stderr)  # noqa: T201
        return 2
    prepare_model_process(settings)
    configure_logging(settings.log_level)
    # Several API processes: /metrics of any one of them reports all of them.
    metrics_directory = share_across_processes() if settings.workers > 1 else None
    supervisor = None
    if settings.workers > 1 and not settings.redis_url:
        supervisor = start_model_process(settings)
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
            timeout_worker_healthcheck=API_PROCESS_HEALTHCHECK_S,
            proxy_headers=True,
            server_header=False,
        )
    finally:
        if supervisor is not None:
            supervisor.stop()  # after uvicorn drained its API processes: their requests were answered
        if metrics_directory is not None:
            shutil.rmtree(metrics_directory, ignore_errors=True)
    if supervisor is not None and supervisor.failed:
        print("error: the model process could not start (see the log above)", file=sys.stderr)  # noqa: T201
        return 1
    return 0


def start_model_process(settings: Settings) -> ModelProcessSupervisor:
    """Start the shared model process and point the API processes at it (``FUNDUS_MODEL_SOCKET``).

    The API processes get an even share of the cores for their own thread pools (torch, used by the
    quality grader, and OpenCV) unless ``OMP_NUM_THREADS`` / ``OPENCV_FOR_THREADS_NUM`` say otherwise;
    the model process keeps the full count (or ``FUNDUS_TORCH_THREADS``).
    """
    import cv2
    import torch

    from service.queue.supervisor import ModelProcessSupervisor

    supervisor = ModelProcessSupervisor(
        torch_threads=settings.torch_threads or torch.get_num_threads(),
        cv_threads=cv2.getNumThreads(),
        on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM),  # uvicorn's supervisor then stops
        stop_timeout_s=settings.shutdown_timeout_s + 5.0,
    )
    supervisor.start()
    os.environ["FUNDUS_MODEL_SOCKET"] = supervisor.socket_path
    share = str(max(1, (os.cpu_count() or 1) // settings.workers))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("OPENCV_FOR_THREADS_NUM", share)
    return supervisor
