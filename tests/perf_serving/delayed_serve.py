"""``fundus serve`` whose model pauses on jobs of requests with ``X-Request-ID: slow-…`` and whose API
processes may start slowly (tests only).

The pause (``FUNDUS_TEST_SLOW_S`` seconds) widens the window in which a test can kill the model process
or stop the server while a batch is in flight. Before pausing, the model process writes its pid into
``FUNDUS_TEST_MARKER_DIR/<request id>``, so a test can poll for "this request reached the model".
With ``FUNDUS_TEST_BUSY_START_S`` each API process holds the GIL that long before loading the app.
Every other request runs the production path unchanged. Processes spawned from this script re-import
it as their main module, so the patch reaches the model process too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import uvicorn.config as uvicorn_config  # noqa: E402

import service.runner as runner_module  # noqa: E402

_load_runner = runner_module.load_runner


def load_delayed_runner(settings: Any, *, on_batch: Any = None) -> tuple[Any, Any]:
    runner, artifact = _load_runner(settings, on_batch=on_batch)
    run_jobs = runner.run_jobs
    delay = float(os.environ.get("FUNDUS_TEST_SLOW_S", "0"))
    markers = os.environ.get("FUNDUS_TEST_MARKER_DIR")

    def run(jobs: Sequence[Any]) -> list[Any]:
        slow = [job.request_id for job in jobs if job.request_id.startswith("slow-")]
        for request_id in slow:
            if markers:
                Path(markers, request_id).write_text(str(os.getpid()))
        if slow:
            time.sleep(delay)  # simulated slow accelerator
        return run_jobs(jobs)

    runner.run_jobs = run
    return runner, artifact


runner_module.load_runner = load_delayed_runner

_load_app = uvicorn_config.Config.load


def load_app_slowly(self: Any) -> None:
    """uvicorn's app loading in an API process, after holding the GIL for ``FUNDUS_TEST_BUSY_START_S``
    seconds, as importing torch does on a slow host: no other thread of the process runs meanwhile.
    (Patched here rather than on ``service.app``, whose import would set up the model process's
    metrics before that process has chosen how to keep them.)"""
    busy = float(os.environ.get("FUNDUS_TEST_BUSY_START_S", "0"))
    if busy > 0 and not self.loaded:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(busy + 60.0)  # the running thread keeps the GIL
        try:
            end = time.monotonic() + busy
            while time.monotonic() < end:
                pass
        finally:
            sys.setswitchinterval(interval)
    _load_app(self)


uvicorn_config.Config.load = load_app_slowly  # type: ignore[method-assign]


if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
