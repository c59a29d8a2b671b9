"""With FUNDUS_REDIS_URL the API process reads only the artifact metadata and uses the Redis queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.redis.conftest import REDIS_SERVER, RedisServer
from tests.service.conftest import encode, fundus_array


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server.url
    server.stop()


@pytest.mark.integration
def test_redis_mode_serves_metadata_and_needs_a_worker(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    with TestClient(create_app(make_settings(redis_url=redis_url))) as client:
        state = client.app.state.service
        assert state.runner is None  # no network loaded in the API process
        assert type(state.queue).__name__ == "RedisQueue"
        info = client.get("/model").json()
        assert info["preset"] == "tiny" and info["device"] == "workers" and info["parameter_count"] > 0
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        response = client.post(
            "/enhance", content=encode(fundus_array()), headers={"content-type": "image/png"}
        )
        assert response.status_code == 503
        assert "retry-after" in response.headers
        assert response.headers["x-model-version"] == info["version"]


@pytest.mark.integration
def test_redis_mode_round_trip_through_a_worker(
    make_settings: Callable[..., Settings], redis_url: str, tiny_artifact: Path
) -> None:
    import threading
    import time

    import torch

    from model.artifact import load_artifact
    from service.runner import ModelRunner
    from service.worker import Worker
    from tests.service.conftest import decode

    artifact = load_artifact(tiny_artifact, "cpu")
    runner = ModelRunner(artifact.model, torch.device("cpu"), artifact.config.working_size)
    worker = Worker(redis_url, runner.run_jobs, max_batch_size=4, model_version=artifact.version)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with TestClient(create_app(make_settings(redis_url=redis_url))) as client:
            deadline = time.monotonic() + 20
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.05)
            body = encode(fundus_array(150, 110))
            enhanced = client.post("/enhance", content=body, headers={"content-type": "image/png"})
            assert enhanced.status_code == 200, enhanced.text
            assert decode(enhanced.content).size == (150, 110)
            assert "inference;dur=" in enhanced.headers["server-timing"]
            # The worker's trust signals travel back through Redis.
            assert enhanced.headers["x-structure-fidelity"].startswith("dice=")
            assert float(enhanced.headers["x-enhance-uncertainty"]) >= 0.0
            assert enhanced.headers["x-quality-after"].split(";")[0] in ("good", "poor")
            uncertainty = client.post(
                "/enhance?output=uncertainty", content=body, headers={"content-type": "image/png"}
            )
            assert uncertainty.status_code == 200 and decode(uncertainty.content).size == (150, 110)
            vessels = client.post("/segment?threshold=0.5", files={"file": ("a.png", body, "image/png")})
            assert vessels.status_code == 200 and decode(vessels.content).mode == "L"
    finally:
        worker.stop()
        thread.join(timeout=10)
