"""Through the HTTP API: a Redis restart under load gives fast 503s, then everything recovers by itself."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.redis.conftest import RedisServer, wait_for
from tests.redis.helpers import EchoRunner, png, synthetic_fundus, worker_thread
from tests.redis.test_redis_processes import api_settings

pytestmark = pytest.mark.integration

PNG = {"content-type": "image/png"}


def test_redis_restart_mid_load_gives_503_then_recovers(
    redis_server: RedisServer, tiny_artifact: Path
) -> None:
    body = png(synthetic_fundus(120, 96))
    runner = EchoRunner(delay_s=0.05)  # stands in for the model; the API maps its output back as usual
    with (
        worker_thread(redis_server.url, runner, heartbeat_ttl_s=0.6),
        TestClient(
            create_app(api_settings(redis_server.url, tiny_artifact, request_timeout_s=20.0))
        ) as client,
    ):
        wait_for(lambda: client.get("/readyz").status_code == 200, 15, "/readyz 200")
        assert client.post("/enhance", content=body, headers=PNG).status_code == 200

        with ThreadPoolExecutor(4) as pool:
            load = [pool.submit(client.post, "/enhance", content=body, headers=PNG) for _ in range(8)]
            redis_server.stop()
            clock = time.monotonic()
            during = client.post("/enhance", content=body, headers=PNG)
            assert during.status_code == 503 and time.monotonic() - clock < 3.0
            assert during.headers["retry-after"]
            assert during.json()["error"]["code"] == "backend_unavailable"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "redis" in ready.text
            # Requests in flight end with an answer or an explicit 503, never a hang or a 500.
            codes = [future.result(timeout=15).status_code for future in load]
        assert set(codes) <= {200, 503}, codes

        redis_server.start()  # same port, empty: nothing in the service is restarted
        wait_for(lambda: client.get("/readyz").status_code == 200, 20, "/readyz 200 after the restart")
        after = client.post("/enhance", content=body, headers=PNG)
        assert after.status_code == 200, after.text
