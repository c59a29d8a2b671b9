"""``fundus worker`` subprocesses on the tiny model: kill -9 mid-batch, SIGTERM drain, HTTP end to end."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from model.artifact import read_metadata
from service.app import create_app
from service.queue.base import JobResult, QueueError
from service.queue.redis_protocol import GROUP, StreamNames
from service.settings import Settings
from tests.redis.conftest import RedisServer, free_port, wait_for
from tests.redis.helpers import WorkerProcess, make_job, png, synthetic_fundus, worker_processes
from tests.redis.test_redis_queue import make_queue, ready, wait_async

pytestmark = pytest.mark.integration

NAMES = StreamNames("fundus")
START_TIMEOUT_S = 90.0  # two cold Python + torch start-ups on a busy 2-core machine


def working_size(weights: Path) -> int:
    return int(read_metadata(weights)["config"]["working_size"])


def wait_for_heartbeats(server: RedisServer, *workers: WorkerProcess) -> None:
    client = server.client()

    def all_alive() -> bool:
        for worker in workers:
            assert worker.alive(), f"worker {worker.name} exited:\n{worker.log()}"
        return all(client.exists(NAMES.heartbeat(worker.name)) for worker in workers)

    wait_for(all_alive, START_TIMEOUT_S, "worker heartbeats")


def holder_of_a_batch(server: RedisServer) -> tuple[str, int] | None:
    summary = server.client().xpending(NAMES.requests, GROUP)
    for consumer in summary["consumers"]:
        name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
        if int(consumer["pending"]) > 0:
            return name, int(consumer["pending"])
    return None


def test_kill_9_of_a_worker_holding_a_batch(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Every accepted job completes (reclaimed by the survivor) before its deadline, each answered once."""
    size = working_size(tiny_artifact)
    workers = {
        name: WorkerProcess(redis_server.url, name, tiny_artifact, tmp_path, delay_s=0.8, claim_idle_s=1.5)
        for name in ("w1", "w2")
    }
    with worker_processes(*workers.values()):
        wait_for_heartbeats(redis_server, *workers.values())

        async def scenario() -> None:
            queue = make_queue(redis_server.url, working_size=size, request_timeout_s=30.0)
            await queue.start()
            try:
                await wait_async(lambda: ready(queue), 10, "readiness")
                timeout_s = 25.0
                tasks = [
                    asyncio.create_task(
                        queue.submit(make_job(f"k{i}", size=size, seed=i, timeout_s=timeout_s))
                    )
                    for i in range(12)
                ]
                started = time.monotonic()
                holder = await asyncio.to_thread(
                    wait_for, lambda: holder_of_a_batch(redis_server), 20, "a worker holding a batch"
                )
                victim = workers[holder[0]]
                victim.kill()  # SIGKILL: no reply, no ack, no heartbeat withdrawal
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                elapsed = time.monotonic() - started
                assert elapsed < timeout_s, "a job outlived its deadline"
                unexpected = [o for o in outcomes if not isinstance(o, JobResult | QueueError)]
                assert not unexpected, unexpected
                results = [o for o in outcomes if isinstance(o, JobResult)]
                # The survivor has ample time: every job completes, none is lost or answered twice.
                assert len(results) == 12, [repr(o) for o in outcomes if not isinstance(o, JobResult)]
                assert all(r.image is not None and r.image.shape == (3, size, size) for r in results)
                assert queue.stats["answered"] == 12
                assert queue.stats["duplicate_replies"] == 0
            finally:
                await queue.stop(1)

        asyncio.run(scenario())
        survivor = next(w for w in workers.values() if w.alive())
        assert "reclaimed orphaned entries" in survivor.log()
        client = redis_server.client()
        wait_for(lambda: client.xlen(NAMES.requests) == 0, 10, "an empty request stream")
        assert client.xpending(NAMES.requests, GROUP)["pending"] == 0


def test_sigterm_finishes_the_current_batch_then_exits_0(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    size = working_size(tiny_artifact)
    worker = WorkerProcess(
        redis_server.url, "drain", tiny_artifact, tmp_path, delay_s=1.5, max_batch_wait_ms=500
    )
    with worker_processes(worker):
        wait_for_heartbeats(redis_server, worker)

        async def scenario() -> list[Any]:
            queue = make_queue(redis_server.url, working_size=size)
            await queue.start()
            try:
                await wait_async(lambda: ready(queue), 10, "readiness")
                tasks = [asyncio.create_task(queue.submit(make_job(f"t{i}", size=size))) for i in range(3)]
                await asyncio.to_thread(
                    wait_for,
                    lambda: (holder_of_a_batch(redis_server) or ("", 0))[1] == 3,
                    20,
                    "the batch of 3",
                )
                worker.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await queue.stop(1)

        outcomes = asyncio.run(scenario())
        assert all(isinstance(o, JobResult) for o in outcomes), outcomes
        assert worker.process.wait(timeout=20) == 0
        client = redis_server.client()
        assert not client.exists(NAMES.heartbeat("drain"))  # withdrawn on a clean stop
        assert client.xlen(NAMES.requests) == 0


def api_settings(url: str, weights: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "weights": weights,
        "redis_url": url,
        "max_queue": 32,
        "request_timeout_s": 30.0,
        "max_batch_size": 4,
        "api_keys": "",
        "log_level": "WARNING",
        "warmup": False,
        "cpu_workers": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_http_end_to_end_with_two_worker_processes(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    metrics_port = free_port()
    workers = (
        WorkerProcess(redis_server.url, "e1", tiny_artifact, tmp_path, metrics_port=metrics_port),
        WorkerProcess(redis_server.url, "e2", tiny_artifact, tmp_path),
    )
    body = png(synthetic_fundus(120, 96))
    with (
        worker_processes(*workers),
        TestClient(create_app(api_settings(redis_server.url, tiny_artifact))) as client,
    ):
        wait_for_heartbeats(redis_server, *workers)
        wait_for(lambda: client.get("/readyz").status_code == 200, 15, "/readyz 200")

        def enhance(i: int) -> Any:
            return client.post(
                "/enhance", content=body, headers={"content-type": "image/png", "x-request-id": f"e{i}"}
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(enhance, range(16)))
        assert [r.status_code for r in responses] == [200] * 16, [
            r.text for r in responses if r.status_code != 200
        ]
        assert all(r.headers["content-type"] == "image/png" for r in responses)
        assert all("inference;dur=" in r.headers.get("server-timing", "") for r in responses)
        segment = client.post("/segment", files={"file": ("x.png", body, "image/png")})
        assert segment.status_code == 200
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "fundus_batch_size_count" in scrape and "fundus_worker_reclaimed_total" in scrape
        assert (
            "fundus_worker_pending_entries" in scrape and "fundus_worker_oldest_pending_age_seconds" in scrape
        )
        batches = sum(
            float(line.split()[-1])
            for line in scrape.splitlines()
            if line.startswith("fundus_batch_size_count")
        )
        assert batches >= 1


def test_http_backpressure_gives_429_with_retry_after(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    worker = WorkerProcess(redis_server.url, "bp", tiny_artifact, tmp_path, delay_s=2.0, max_batch_size=1)
    body = png(synthetic_fundus(120, 96))
    settings = api_settings(redis_server.url, tiny_artifact, max_queue=1)
    with worker_processes(worker), TestClient(create_app(settings)) as client:
        wait_for_heartbeats(redis_server, worker)
        wait_for(lambda: client.get("/readyz").status_code == 200, 15, "/readyz 200")
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda _: client.post("/enhance", content=body, headers={"content-type": "image/png"}),
                    range(4),
                )
            )
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"


def test_two_workers_on_one_host_get_their_own_metrics_ports(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    """With the default (automatic) metrics port, a second worker on the same host does not exit with
    "address already in use": it takes the next free port, and says which in its log."""
    import json

    first = WorkerProcess(redis_server.url, "first", tiny_artifact, tmp_path, metrics_port=-1)
    second = WorkerProcess(redis_server.url, "second", tiny_artifact, tmp_path, metrics_port=-1)
    with worker_processes(first, second):
        wait_for_heartbeats(redis_server, first, second)

        def port(worker: WorkerProcess) -> int | None:
            for line in worker.log().splitlines():
                record = json.loads(line) if line.startswith("{") else {}
                if record.get("msg") == "worker metrics":
                    return int(record["port"])
            return None

        ports = [wait_for(lambda w=w: port(w), 20, f"{w.name}'s metrics port") for w in (first, second)]
        assert first.alive() and second.alive()
        assert len(set(ports)) == 2 and all(p >= 9101 for p in ports), ports
        for number in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{number}/metrics", timeout=5) as response:
                assert b"fundus_worker" in response.read()
