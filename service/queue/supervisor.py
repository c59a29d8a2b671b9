"""Starts, watches and restarts the local model process of ``fundus serve --workers N``.

Runs in the ``fundus serve`` parent process, beside uvicorn's own worker supervisor. The model
process listens on a socket in a private temporary folder (mode 0700), so only this user's
processes can send it jobs. When it dies, the API processes answer 503 for what was in flight and
while it is down (``/readyz`` says why), and this supervisor starts a new one after a short pause.
A model process that dies before it ever became ready :data:`MAX_FAILED_STARTS` times in a row
(missing GPU, broken weights) is not retried: ``on_give_up`` stops the server with an error instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from pathlib import Path

from service.queue.model_process import run_model_process

log = logging.getLogger("fundus.supervisor")

#: Consecutive deaths before readiness after which the supervisor gives up.
MAX_FAILED_STARTS = 3
#: Pause before a restart, doubled after each failed start up to :data:`MAX_RESTART_PAUSE_S`.
RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0


class ModelProcessSupervisor:
    """Owns the model process and its socket folder.

    Args:
        torch_threads / cv_threads: intra-op threads the model process uses (see
            :func:`service.queue.model_process.run_model_process`).
        on_give_up: called (from the watcher thread) when restarting is pointless.
        stop_timeout_s: how long :meth:`stop` lets the model process drain before killing it.
    """

    def __init__(
        self,
        *,
        torch_threads: int,
        cv_threads: int,
        on_give_up: Callable[[], None],
        stop_timeout_s: float = 35.0,
    ) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="fundus-model-"))
        self.socket_path = str(self.directory / "model.sock")
        self.torch_threads = torch_threads
        self.cv_threads = cv_threads
        self.on_give_up = on_give_up
        self.stop_timeout_s = stop_timeout_s
        self.restarts = 0
        self.failed = False
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: SpawnProcess | None = None
        self._ready = self._context.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The current model process's pid."""
        process = self._process
        return None if process is None else process.pid

    def start(self) -> None:
        """Spawn the model process and watch it from a daemon thread."""
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="fundus-model-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, let the model process drain (SIGTERM), kill it after ``stop_timeout_s``."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(self.stop_timeout_s)
            if process.is_alive():
                log.error("model process did not stop in time; killing it", extra={"pid": process.pid})
                process.kill()
                process.join(5.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._ready = self._context.Event()
            process = self._context.Process(
                target=run_model_process,
                args=(self.socket_path, os.getpid(), self._ready, self.torch_threads, self.cv_threads),
                name="fundus-model",
                daemon=False,
            )
            process.start()
            self._process = process
        log.info("model process started", extra={"pid": process.pid, "socket": self.socket_path})

    def _watch(self) -> None:
        failed_starts = 0
        pause = RESTART_PAUSE_S
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            multiprocessing.connection.wait([process.sentinel], timeout=0.5)
            if process.is_alive() or self._stopping.is_set():
                continue
            was_ready = self._ready.is_set()
            log.error(
                "model process exited",
                extra={"pid": process.pid, "exitcode": process.exitcode, "was_ready": was_ready},
            )
            if was_ready:
                failed_starts, pause = 0, RESTART_PAUSE_S
            else:
                failed_starts += 1
                if failed_starts >= MAX_FAILED_STARTS:
                    log.critical(
                        "model process failed to start repeatedly; stopping the server",
                        extra={"attempts": failed_starts},
                    )
                    self.failed = True
                    self.on_give_up()
                    return
            if self._stopping.wait(pause):  # restart pacing (also wakes up at once on stop)
                return
            if not was_ready:
                pause = min(pause * 2, MAX_RESTART_PAUSE_S)
            self.restarts += 1
            self._spawn()
