"""``fundus serve`` with the model replaced by an identity pass: for benchmarks only, never for production.

    python bench/identity_serve.py [--workers N] [any other `fundus serve` flag]

The weights are still loaded (the working size, the version and ``/model`` stay real), but every
batch answers each job's own input as the enhanced image (and its green channel as the vessel map),
with an all-zero uncertainty map, perfect structure fidelity and fixed quality grades (the model
process grades input and output inside its pass), so the answers keep the size and fields of real
ones (the IPC path carries the same bytes). What remains is the HTTP path's own cost: upload,
decode, FOV, crop, the queue hop, map back and encode. ``bench/serve_bench.py --identity`` drives it.

The patch is applied at import: processes spawned from this script (uvicorn's API workers, the
model process of ``--workers N``) re-import it as their main module, so they serve the identity too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import service.runner as runner_module  # noqa: E402
from service.queue.base import Job, JobResult, Task  # noqa: E402

_load_real_runner = runner_module.load_runner


class IdentityRunner:
    """Stands in for :class:`service.runner.ModelRunner`: same interface, no model pass."""

    def __init__(self, runner: Any, on_batch: Any = None) -> None:
        self.device = runner.device
        self.working_size = runner.working_size
        self.on_batch = on_batch
        size = runner.working_size
        self._zeros = np.zeros((size, size), dtype=np.uint8)

    def run_jobs(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Each job's input back as its answer (fresh arrays, as a model would produce)."""
        started = time.time()
        clock = time.perf_counter()
        results = []
        for job in jobs:
            enhance = job.task is Task.ENHANCE
            results.append(
                JobResult(
                    image=job.pixels.copy() if enhance else None,
                    vessels=None if enhance else job.pixels[1].copy(),
                    queue_seconds=max(0.0, started - job.enqueued_at),
                    inference_seconds=0.0,
                    batch_size=len(jobs),
                    uncertainty=self._zeros.copy() if enhance else None,
                    uncertainty_mean=0.0 if enhance else None,
                    fidelity={"dice": 1.0, "removed": 0.0, "added": 0.0} if enhance else None,
                    # A real model process grades input and output inside its pass (see ModelRunner).
                    quality_before=0.5 if enhance else None,
                    quality_after=0.5 if enhance else None,
                )
            )
        seconds = time.perf_counter() - clock
        for result in results:
            result.inference_seconds = seconds
        if self.on_batch is not None:
            self.on_batch(len(jobs), seconds)
        return results

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        return 0.0


def load_identity_runner(settings: Any, *, on_batch: Any = None) -> tuple[IdentityRunner, Any]:
    """``load_runner`` with the same artifact checks, answering an :class:`IdentityRunner`."""
    runner, artifact = _load_real_runner(settings, on_batch=None)
    return IdentityRunner(runner, on_batch), artifact


runner_module.load_runner = load_identity_runner  # before service.app imports it


if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
