"""``fundus serve`` whose model pauses on jobs of requests with ``X-Request-ID: slow-…`` (tests only).

The pause (``FUNDUS_TEST_SLOW_S`` seconds) widens the window in which a test can kill the model process
or stop the server while a batch is in flight. Before pausing, the model process writes its pid into
``FUNDUS_TEST_MARKER_DIR/<request id>``, so a test can poll for "this request reached the model".
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


if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
