"""``fundus serve --workers 2``: two API processes and one model process, as real processes.

* Concurrent requests of distinct images through both API processes each get the answer to their
  own input: the same as the single-process service gives for that image (no cross-talk).
* Killing the model process mid-batch gives a clean 503 with Retry-After (no hang); the supervisor
  restarts it and the service answers again.
* SIGTERM drains: a request in flight in the model process is answered, then everything exits.
* A model process that cannot start at all stops the server with an error instead of restarting forever.
* /metrics, whichever API process answers it, counts the requests of all of them (and not the model
  process's own batch series a second time); the shared metrics folder is removed on exit.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.perf_serving.conftest import SLOW_S, ServeProcess, pid_alive, wait_for
from tests.service.conftest import encode, fundus_array

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PNG = {"content-type": "image/png"}
IMAGES = [encode(fundus_array(160, 120, seed=i)) for i in range(8)]
PATHS = ("/enhance", "/segment")


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16)


@pytest.fixture(scope="module")
def references(tiny_artifact: Path) -> dict[tuple[str, int], httpx.Response]:
    """Every (path, image) answered by the single-process service, one image per model pass."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        weights=tiny_artifact,
        device="cpu",
        max_batch_size=1,
        warmup=False,
        torch_threads=1,
        api_keys="",
        redis_url=None,
        log_level="WARNING",
    )
    with TestClient(create_app(settings)) as client:
        return {
            (path, i): client.post(path, content=body, headers=PNG)
            for path in PATHS
            for i, body in enumerate(IMAGES)
        }


def test_concurrent_answers_match_their_own_inputs(
    serve_process: ServeProcess, references: dict[tuple[str, int], httpx.Response]
) -> None:
    work = [(path, i) for _ in range(2) for path in PATHS for i in range(len(IMAGES))]

    def call(item: tuple[str, int]) -> tuple[tuple[str, int], httpx.Response]:
        path, i = item
        response = httpx.post(f"{serve_process.url}{path}", content=IMAGES[i], headers=PNG, timeout=60)
        return item, response

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(call, work))
    for (path, i), response in answers:
        assert response.status_code == 200, response.text
        own = pixels(references[(path, i)].content)
        got = pixels(response.content)
        assert got.shape == own.shape
        # A batched pass may round a few pixels differently from a single one (here they agree exactly);
        # the answer to another image differs everywhere (mean difference above 1 grey level even for
        # the random tiny model's faint vessel maps, 7 for enhanced images).
        assert np.abs(got - own).mean() < 0.2, (path, i)
        others = [pixels(references[(path, j)].content) for j in range(len(IMAGES)) if j != i]
        assert min(np.abs(got - other).mean() for other in others) > 1.0, (path, i)
        if path == "/enhance":
            reference = references[(path, i)].headers
            assert response.headers["x-fov"] == reference["x-fov"]
            assert float(response.headers["x-enhance-uncertainty"]) == pytest.approx(
                float(reference["x-enhance-uncertainty"]), abs=2e-3
            )
            assert "dice=" in response.headers["x-structure-fidelity"]
            assert response.headers["x-quality-before"] == reference["x-quality-before"]
    # Both API processes hold a connection to the one model process.
    assert '"connections": 2' in serve_process.log()


def start_slow_request(
    server: ServeProcess, image: bytes, request_id: str
) -> tuple[threading.Thread, dict[str, httpx.Response], int]:
    """POST ``image`` as ``/enhance`` request ``request_id`` (a ``slow-…`` id: its batch pauses in the
    model process) from a thread. Returns the thread, the dict its response lands in under
    ``"response"``, and the model process's pid once the job has reached it."""
    outcome: dict[str, httpx.Response] = {}

    def send() -> None:
        outcome["response"] = httpx.post(
            f"{server.url}/enhance", content=image, headers={**PNG, "x-request-id": request_id}, timeout=60
        )

    caller = threading.Thread(target=send)
    caller.start()
    model_pid = wait_for(lambda: server.marker_pid(request_id), 30, "the job to reach the model")
    return caller, outcome, model_pid


def test_model_process_death_gives_503_then_recovers(serve_process: ServeProcess) -> None:
    caller, outcome, model_pid = start_slow_request(serve_process, IMAGES[0], "slow-crash")
    clock = time.monotonic()
    os.kill(model_pid, signal.SIGKILL)
    caller.join(timeout=30)
    assert not caller.is_alive(), "the request hung after the model process died"
    response = outcome["response"]
    assert response.status_code == 503
    assert time.monotonic() - clock < SLOW_S  # failed at once, not after the batch would have ended
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    serve_process.wait_ready(timeout=90)  # the supervisor started a new model process
    again = httpx.post(f"{serve_process.url}/enhance", content=IMAGES[1], headers=PNG, timeout=60)
    assert again.status_code == 200
    assert "model process exited" in serve_process.log()
    assert not pid_alive(model_pid)


def test_sigterm_drains_work_in_flight(tmp_path: Path, tiny_artifact: Path) -> None:
    server = ServeProcess(tmp_path, tiny_artifact)
    server.start()
    try:
        server.wait_ready()
        caller, outcome, model_pid = start_slow_request(server, IMAGES[2], "slow-drain")
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)  # what docker stop / Kubernetes send
        caller.join(timeout=60)
        assert outcome["response"].status_code == 200  # answered, not cut off
        assert outcome["response"].headers["x-request-id"] == "slow-drain"
        assert server.process.wait(timeout=40) == 0
        exited: Callable[[], bool] = lambda: not pid_alive(model_pid)  # noqa: E731
        wait_for(exited, 10, "the model process to exit")
        assert "model process stopped" in server.log()
    finally:
        server.stop()


def test_model_process_that_cannot_start_stops_the_server(tmp_path: Path, tiny_artifact: Path) -> None:
    server = ServeProcess(tmp_path, tiny_artifact, FUNDUS_DEVICE="cuda:99")
    server.start()
    try:
        assert server.process is not None
        assert server.process.wait(timeout=120) == 1
        log = server.log()
        assert log.count("model process cannot start") == 3
        assert "the model process could not start" in log
    finally:
        server.stop()


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value of every sample in a scrape (labels sorted, as the text format has them)."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_every_scrape_counts_the_requests_of_all_api_processes(tmp_path: Path, tiny_artifact: Path) -> None:
    requests = 10
    server = ServeProcess(tmp_path / "serve", tiny_artifact, TMPDIR=str(tmp_path))
    server.start()
    try:
        server.wait_ready()
        for i in range(requests):
            # A new connection each time: the kernel hands them to either API process.
            response = httpx.post(
                f"{server.url}/enhance", content=IMAGES[i % len(IMAGES)], headers=PNG, timeout=60
            )
            assert response.status_code == 200, response.text
        scrapes = [httpx.get(f"{server.url}/metrics", timeout=10).text for _ in range(6)]
        assert list(tmp_path.glob("fundus-metrics-*")), "the API processes share no metrics folder"
    finally:
        server.stop()
    for text in scrapes:
        values = _samples(text)
        assert values['fundus_requests_total{endpoint="/enhance",status="200"}'] == requests
        assert values['fundus_request_duration_seconds_count{endpoint="/enhance"}'] == requests
        # Observed once per request by the API; the model process's own series stay on its own port.
        assert values["fundus_queue_wait_seconds_count"] == requests
        assert values["fundus_inflight_requests"] == 1  # the scrape itself
        assert values["fundus_ready"] == 1
        assert values["fundus_queue_depth"] == 0
        assert text.count("# TYPE fundus_queue_depth gauge") == 1
    assert not list(tmp_path.glob("fundus-metrics-*")), "the metrics folder outlived the server"


def test_api_processes_that_start_slowly_are_not_killed(tmp_path: Path, tiny_artifact: Path) -> None:
    """On a loaded host, an API process's start-up (importing torch) can keep its liveness-ping thread
    off the GIL for several seconds; uvicorn's default 5 s ping timeout then killed and replaced such
    processes during start-up, over and over. Here each one holds the GIL for 7 s before building
    the app."""
    server = ServeProcess(tmp_path, tiny_artifact, FUNDUS_TEST_BUSY_START_S="7")
    server.start()
    try:
        server.wait_ready(timeout=90)
        response = httpx.post(f"{server.url}/enhance", content=IMAGES[0], headers=PNG, timeout=60)
        assert response.status_code == 200
        log = server.log()
        assert "died" not in log, log[-3000:]
        assert log.count('"msg": "Started server process') == server.workers
    finally:
        server.stop()
