"""Test doubles and harness for the Redis queue tests: a deterministic batch function, worker threads."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.queue.base import Job, JobResult, Task
from service.worker import Worker

SIZE = 16  # working size of the synthetic jobs


class SimulatedCrash(BaseException):
    """Escapes the worker loop like a process death would: nothing is acked, the thread ends."""


class EchoRunner:
    """Deterministic stand-in for the model: enhance → 255 - pixels, segment → the red channel.

    Records every job it ran (by request id); can be slowed down, made to raise (poison) or to
    "crash" (``SimulatedCrash``) on chosen request ids.
    """

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        fail_on: set[str] | None = None,
        crash_on: set[str] | None = None,
        started: threading.Event | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on or set()
        self.crash_on = crash_on or set()
        self.started = started
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    @property
    def runs(self) -> Counter[str]:
        with self.lock:
            return Counter(rid for batch in self.batches for rid in batch)

    def __call__(self, jobs: Sequence[Job]) -> list[JobResult]:
        ids = [job.request_id for job in jobs]
        with self.lock:
            self.batches.append(ids)
        if self.started is not None:
            self.started.set()
        if self.crash_on.intersection(ids):
            raise SimulatedCrash(f"crash on {sorted(self.crash_on.intersection(ids))}")
        if self.fail_on.intersection(ids):
            raise ValueError("poison image")
        if self.delay_s:
            time.sleep(self.delay_s)  # simulated model time
        return [
            JobResult(
                image=(255 - job.pixels) if job.task is Task.ENHANCE else None,
                vessels=job.pixels[0].copy() if job.task is Task.SEGMENT else None,
                queue_seconds=0.0,
                inference_seconds=self.delay_s,
                batch_size=len(jobs),
            )
            for job in jobs
        ]


def make_job(
    request_id: str, *, timeout_s: float = 20.0, task: Task = Task.ENHANCE, seed: int = 0, size: int = SIZE
) -> Job:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(3, size, size), dtype=np.uint8)
    return Job(request_id=request_id, task=task, pixels=pixels, deadline=time.time() + timeout_s)


@contextmanager
def worker_thread(url: str, runner: Any, **options: Any) -> Iterator[Worker]:
    """Run a :class:`Worker` in a thread; stop and join it on exit."""
    worker = Worker(url, runner, **options)
    thread = threading.Thread(target=_run_quietly, args=(worker,), daemon=True)
    thread.start()
    worker.thread = thread  # type: ignore[attr-defined]
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "worker thread did not stop"


def _run_quietly(worker: Worker) -> None:
    with contextlib.suppress(SimulatedCrash):  # the "process" died holding its batch
        worker.run()


REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW_WORKER = Path(__file__).with_name("slow_worker.py")


def synthetic_fundus(width: int = 120, height: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: a noisy orange disc on black, enough for the FOV detector."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    inside = (xs - width / 2) ** 2 + (ys - height / 2) ** 2 <= (0.45 * min(width, height)) ** 2
    image = np.zeros((height, width, 3), dtype=np.uint8)
    noise = rng.integers(-25, 25, size=(height, width, 3), dtype=np.int16)
    image[inside] = np.clip(np.array([170, 80, 35], dtype=np.int16) + noise[inside], 0, 255).astype(np.uint8)
    return image


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class WorkerProcess:
    """A ``fundus worker`` subprocess (optionally the slowed-down test variant) with its log file."""

    def __init__(
        self,
        url: str,
        name: str,
        weights: Path,
        log_dir: Path,
        *,
        delay_s: float | None = None,
        claim_idle_s: float = 2.0,
        metrics_port: int = 0,
        max_batch_size: int = 4,
        max_batch_wait_ms: float = 20.0,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        program = [str(SLOW_WORKER)] if delay_s is not None else ["-m", "service.cli", "worker"]
        command = [
            sys.executable,
            *program,
            "--redis-url",
            url,
            "--name",
            name,
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--metrics-port",
            str(metrics_port),
            "--claim-idle-s",
            str(claim_idle_s),
            "--max-batch-size",
            str(max_batch_size),
            "--max-batch-wait-ms",
            str(max_batch_wait_ms),
        ]
        env = {
            **os.environ,
            "FUNDUS_WORKER_HEARTBEAT_TTL_S": "1.5",
            "FUNDUS_TORCH_THREADS": "1",
            "FUNDUS_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO_ROOT),
            "OMP_NUM_THREADS": "1",
        }
        if delay_s is not None:
            env["FUNDUS_TEST_BATCH_DELAY_S"] = str(delay_s)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextmanager
def worker_processes(*workers: WorkerProcess) -> Iterator[tuple[WorkerProcess, ...]]:
    try:
        yield workers
    finally:
        for worker in workers:
            worker.close()
