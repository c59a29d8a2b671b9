"""Concurrency over HTTP: batches form, the queue bound gives 429, deadlines give 504,
disconnects are dropped, draining refuses work."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.runner import ModelRunner
from service.settings import Settings
from tests.service.conftest import encode, fundus_array

T = TypeVar("T")
PNG = {"content-type": "image/png"}


def sample(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(s.value)
    return 0.0


def serve(settings: Settings, scenario: Callable[[FastAPI, httpx.AsyncClient], Awaitable[T]]) -> T:
    """Run ``scenario`` against a started app through an in-process ASGI client (concurrent requests)."""

    async def main() -> T:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                return await scenario(app, client)

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_concurrent_requests_share_one_model_pass(make_settings: Callable[..., Settings]) -> None:
    bodies = [encode(fundus_array(seed=i)) for i in range(4)]

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> None:
        calls = [
            client.post("/enhance", content=bodies[0], headers=PNG),
            client.post("/enhance", content=bodies[1], headers=PNG),
            client.post("/segment", content=bodies[2], headers=PNG),
            client.post("/segment?threshold=0.5", content=bodies[3], headers=PNG),
        ]
        responses = await asyncio.gather(*calls)
        assert [r.status_code for r in responses] == [200] * 4
        assert {r.headers["x-batch-size"] for r in responses} == {"4"}
        text = (await client.get("/metrics")).text
        assert sample(text, "fundus_batch_size_count") == 1
        assert sample(text, "fundus_batch_size_sum") == 4
        assert sample(text, "fundus_batch_size_bucket", {"le": "3.0"}) == 0
        assert sample(text, "fundus_inference_duration_seconds_count") == 1
        assert sample(text, "fundus_queue_wait_seconds_count") == 4

    # A long wait and a batch size equal to the number of requests: the batch can only leave full.
    serve(make_settings(max_batch_size=4, max_batch_wait_ms=10_000), scenario)


@pytest.fixture
def model_gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every model pass until the event is set (set on teardown), to make queueing deterministic."""
    gate = threading.Event()
    original = ModelRunner.run_jobs

    def gated(self: ModelRunner, jobs):  # type: ignore[no-untyped-def]
        gate.wait(timeout=30)
        return original(self, jobs)

    monkeypatch.setattr(ModelRunner, "run_jobs", gated)
    yield gate
    gate.set()


def test_full_queue_gives_429_with_retry_after(
    make_settings: Callable[..., Settings], model_gate: threading.Event
) -> None:
    body = encode(fundus_array())

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> None:
        queue = app.state.service.queue
        running = asyncio.create_task(client.post("/enhance", content=body, headers=PNG))
        await until(lambda: queue.in_flight == 1)
        waiting = asyncio.create_task(client.post("/segment", content=body, headers=PNG))
        await until(lambda: queue.depth() == 1)
        refused = await client.post("/enhance", content=body, headers=PNG)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        model_gate.set()
        assert [(await running).status_code, (await waiting).status_code] == [200, 200]
        text = (await client.get("/metrics")).text
        assert sample(text, "fundus_rejected_total", {"reason": "queue_full"}) == 1
        assert sample(text, "fundus_requests_total", {"endpoint": "/enhance", "status": "429"}) == 1

    serve(make_settings(max_batch_size=1, max_queue=1), scenario)


def test_deadline_while_queued_gives_504_and_skips_the_model(
    make_settings: Callable[..., Settings], model_gate: threading.Event
) -> None:
    body = encode(fundus_array())

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> None:
        queue = app.state.service.queue
        first = asyncio.create_task(client.post("/enhance", content=body, headers=PNG))
        await until(lambda: queue.in_flight == 1)
        second = await client.post("/segment", content=body, headers=PNG)
        assert second.status_code == 504
        assert second.json()["error"]["code"] == "deadline_exceeded"
        model_gate.set()
        assert (await first).status_code == 504  # its deadline passed while the model was held
        registry = app.state.metrics.registry
        await until(lambda: registry.get_sample_value("fundus_batch_size_count") == 1)
        assert queue.in_flight == 0 and queue.depth() == 0
        text = (await client.get("/metrics")).text
        assert sample(text, "fundus_batch_size_count") == 1  # the queued request never reached the model
        assert sample(text, "fundus_rejected_total", {"reason": "deadline_exceeded"}) == 2

    serve(make_settings(max_batch_size=1, request_timeout_s=1.0), scenario)


def test_deadline_at_enqueue_gives_504(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(request_timeout_s=0.0005))) as client:
        response = client.post("/enhance", content=encode(fundus_array()), headers=PNG)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert sample(client.get("/metrics").text, "fundus_batch_size_count") == 0


def test_disconnected_client_is_dropped_before_the_model(
    make_settings: Callable[..., Settings], model_gate: threading.Event
) -> None:
    body = encode(fundus_array())

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> None:
        queue = app.state.service.queue
        holder = asyncio.create_task(client.post("/segment", content=body, headers=PNG))
        await until(lambda: queue.in_flight == 1)
        disconnect = asyncio.Event()
        sent: list[dict] = []
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/enhance",
            "raw_path": b"/enhance",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/png"), (b"host", b"service")],
            "client": ("127.0.0.1", 1),
            "server": ("service", 80),
        }
        call = asyncio.create_task(app(scope, receive, send))
        await until(lambda: queue.depth() == 1)
        disconnect.set()
        await call
        assert queue.depth() == 0
        model_gate.set()
        assert (await holder).status_code == 200
        text = (await client.get("/metrics")).text
        assert sample(text, "fundus_rejected_total", {"reason": "client_disconnected"}) == 1
        assert sample(text, "fundus_batch_size_count") == 1  # only the holder's pass ran
        assert sample(text, "fundus_batch_size_sum") == 1

    serve(make_settings(max_batch_size=1), scenario)


def test_draining_refuses_new_image_requests(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as client:
        state = client.app.state.service
        state.draining = True
        try:
            response = client.post("/enhance", content=encode(fundus_array()), headers=PNG)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "shutting_down"
            assert int(response.headers["retry-after"]) >= 1
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
        finally:
            state.draining = False


@pytest.mark.parametrize("workers_busy", [False])
def test_readyz_before_start_is_503(make_settings: Callable[..., Settings], workers_busy: bool) -> None:
    app = create_app(make_settings())
    client = TestClient(app)  # no lifespan: weights not loaded
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    assert client.post("/enhance", content=encode(fundus_array()), headers=PNG).status_code == 503


def test_oversized_stream_is_refused_without_reading_it_all(make_settings: Callable[..., Settings]) -> None:
    chunk = b"\x89PNG\r\n\x1a\n" + bytes(4088)  # 4 KiB chunks, 4 MiB in all, no Content-Length
    consumed = 0

    async def body():
        nonlocal consumed
        for _ in range(1024):
            consumed += 1
            yield chunk

    async def scenario(app: FastAPI, client: httpx.AsyncClient) -> None:
        response = await client.post("/enhance", content=body(), headers=PNG)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        assert consumed < 64  # the limit is 100 KiB ≈ 25 chunks

    serve(make_settings(max_upload_mb=0.1), scenario)


def test_internal_failure_is_a_json_500_without_internals(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.routes.images as images

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(images, "restore_enhanced", broken)
    with TestClient(create_app(make_settings())) as client:
        response = client.post("/enhance", content=encode(fundus_array()), headers=PNG)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal_error" and "secret" not in response.text
        assert error["request_id"] == response.headers["x-request-id"]
        assert client.get("/healthz").status_code == 200
        segment = client.post("/segment", content=encode(fundus_array()), headers=PNG)
        assert segment.status_code == 200  # the batcher and the app carry on
