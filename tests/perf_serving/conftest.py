"""A real ``fundus serve --workers N`` (API processes + one model process) on the tiny weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.polling import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DELAYED_SERVE = Path(__file__).with_name("delayed_serve.py")
#: How long a ``slow-…`` request's batch pauses in the model process.
SLOW_S = 3.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not alive either.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class ServeProcess:
    """``tests/perf_serving/delayed_serve.py --workers N``: the production command plus a test pause."""

    def __init__(self, workdir: Path, weights: Path, workers: int = 2, **env: str) -> None:
        self.workdir = workdir
        self.workers = workers
        self.markers = workdir / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "FUNDUS_WEIGHTS": str(weights),
            "FUNDUS_DEVICE": "cpu",
            "FUNDUS_HOST": "127.0.0.1",
            "FUNDUS_PORT": str(self.port),
            "FUNDUS_WORKERS": str(workers),
            "FUNDUS_LOG_LEVEL": "INFO",
            "FUNDUS_WORKER_METRICS_PORT": "0",
            "FUNDUS_TORCH_THREADS": "1",
            "FUNDUS_CPU_WORKERS": "2",
            "FUNDUS_MAX_BATCH_SIZE": "4",
            "FUNDUS_MAX_BATCH_WAIT_MS": "2",
            "FUNDUS_MAX_QUEUE": "32",
            "FUNDUS_WARMUP": "false",
            "FUNDUS_API_KEYS": "",
            "FUNDUS_SHUTDOWN_TIMEOUT_S": "20",
            "FUNDUS_TEST_SLOW_S": str(SLOW_S),
            "FUNDUS_TEST_MARKER_DIR": str(self.markers),
            **env,
        }
        for name in ("FUNDUS_REDIS_URL", "FUNDUS_MODEL_SOCKET"):
            self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(DELAYED_SERVE)],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own group: a stray group signal never reaches pytest
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def api_processes_ready(self) -> int:
        """How many API processes have logged that they are ready (``/readyz`` reaches only one)."""
        return self.log().count('"msg": "ready"')

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until ``/readyz`` answers ready and every API process has finished its start-up."""
        try:
            wait_for(
                lambda: self.ready() and self.api_processes_ready() >= self.workers,
                timeout,
                f"the server and its {self.workers} API processes to report ready",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()[-4000:]}") from None

    def marker_pid(self, request_id: str) -> int | None:
        """The model process pid once the request's batch started there, else None."""
        path = self.markers / request_id
        text = path.read_text() if path.exists() else ""
        return int(text) if text.strip() else None

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[ServeProcess]:
    """A started, ready ``fundus serve --workers 2`` shared by a module; stopped (SIGTERM) afterwards."""
    server = ServeProcess(tmp_path_factory.mktemp("serve"), tiny_artifact)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
