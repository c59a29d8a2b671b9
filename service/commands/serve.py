"""``fundus serve``: the HTTP API under uvicorn (embedded queue unless ``FUNDUS_REDIS_URL`` is set).

Each uvicorn process holds its own model copy, so ``--workers`` is the number of model copies; on
one GPU keep it at 1 and let the micro-batcher provide concurrency. Command-line flags override the
matching ``FUNDUS_*`` variables (they are written back to the environment so worker processes,
which build their app from the environment, see the same values).
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the HTTP API (FastAPI + uvicorn)")
    parser.add_argument("--host", help="bind address (FUNDUS_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="bind port (FUNDUS_PORT, default 8000)")
    parser.add_argument(
        "--workers", type=int, help="server processes = model copies (FUNDUS_WORKERS, default 1)"
    )
    parser.add_argument("--weights", help="weight artifact (FUNDUS_WEIGHTS, default the bundled teacher)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (FUNDUS_DEVICE)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from model.artifact import ArtifactError, read_metadata
    from service.logging import configure_logging
    from service.runner import prepare_model_process
    from service.settings import load_settings

    overrides = {
        "HOST": args.host,
        "PORT": args.port,
        "WORKERS": args.workers,
        "WEIGHTS": args.weights,
        "DEVICE": args.device,
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"FUNDUS_{name}"] = str(value)
    try:
        settings = load_settings()
    except ValidationError as exc:
        print(f"error: invalid FUNDUS_* settings:\n{exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        read_metadata(settings.weights)  # fail fast, before uvicorn forks, with a one-line reason
    except ArtifactError as exc:
        print(f"error: cannot serve: {exc} (set FUNDUS_WEIGHTS or --weights)", file=sys.stderr)  # noqa: T201
        return 2
    prepare_model_process(settings)
    configure_logging(settings.log_level)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        proxy_headers=True,
        server_header=False,
    )
    return 0
