"""The local model-process queue in one event loop: the API side (IpcQueue) against the model side
(ModelServer + EmbeddedQueue) over a real Unix socket, with a stand-in batch function."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    InferenceFailed,
    Job,
    JobResult,
    QueueFull,
    Task,
)
from service.queue.embedded import EmbeddedQueue
from service.queue.ipc_backend import IpcQueue
from service.queue.ipc_protocol import (
    decode_answer,
    error_frame,
    job_frame,
    pack,
    result_frame,
    unpack,
)
from service.queue.ipc_server import ModelServer
from service.queue.redis_protocol import ProtocolError, decode_request

T = TypeVar("T")
SIZE = 16


def job(seed: int, *, timeout_s: float = 10.0, task: Task = Task.ENHANCE) -> Job:
    pixels = np.random.default_rng(seed).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    return Job(request_id=f"r{seed}", task=task, pixels=pixels, deadline=time.time() + timeout_s)


def echo(jobs: Sequence[Job]) -> list[JobResult]:
    """Identity 'model' with every trust field set, so the answer proves which input it came from."""
    return [
        JobResult(
            image=j.pixels.copy(),
            vessels=j.pixels[1].copy(),
            queue_seconds=0.001,
            inference_seconds=0.002,
            batch_size=len(jobs),
            uncertainty=j.pixels[0].copy(),
            uncertainty_mean=float(j.pixels.mean()) / 255.0,
            fidelity={"dice": 0.9, "removed": 0.05, "added": 0.1},
        )
        for j in jobs
    ]


class Gate:
    """A batch function that blocks until released (a slow model), recording what it ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen: list[str] = []

    def __call__(self, jobs: Sequence[Job]) -> list[JobResult]:
        self.seen += [j.request_id for j in jobs]
        self.started.set()
        self.release.wait(10)  # the simulated model pass
        return echo(jobs)


def run(
    batch: Callable[[Sequence[Job]], list[JobResult]],
    scenario: Callable[[IpcQueue, ModelServer], Awaitable[T]],
    *,
    max_queue: int = 16,
    max_batch_size: int = 4,
) -> T:
    async def main() -> T:
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "model.sock")
            queue = EmbeddedQueue(batch, max_batch_size=max_batch_size, max_wait_s=0.0, max_queue=max_queue)
            await queue.start()
            server = ModelServer(queue, working_size=SIZE)
            await server.start(path)
            client = IpcQueue(path, working_size=SIZE)
            await client.start()
            try:
                await until(lambda: client.connected)
                return await scenario(client, server)
            finally:
                await client.stop(1.0)
                await server.close(1.0)
                await queue.stop(1.0)

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def test_frames_round_trip_with_trust_signals() -> None:
    original = job(1)
    entry = decode_request(unpack(job_frame(original, "j1")[4:]))
    np.testing.assert_array_equal(entry.job.pixels, original.pixels)
    assert (entry.job_id, entry.job.request_id, entry.job.task) == ("j1", "r1", Task.ENHANCE)
    result = echo([original])[0]
    job_id, answer = decode_answer(unpack(result_frame("j1", result, depth=3)[4:]))
    assert job_id == "j1" and isinstance(answer, JobResult)
    for name in ("image", "vessels", "uncertainty"):
        np.testing.assert_array_equal(getattr(answer, name), getattr(result, name))
    assert answer.uncertainty_mean == result.uncertainty_mean and answer.fidelity == result.fidelity
    _, error = decode_answer(unpack(error_frame("j2", QueueFull("full", retry_after_s=7.5), depth=0)[4:]))
    assert isinstance(error, QueueFull) and error.retry_after_s == 7.5 and error.status_code == 429
    with pytest.raises(ProtocolError):
        unpack(pack({"a": b"x" * 10})[4:-3])


def test_concurrent_jobs_get_their_own_answers() -> None:
    async def scenario(client: IpcQueue, _server: ModelServer) -> None:
        jobs = [job(i, task=Task.SEGMENT if i % 3 == 0 else Task.ENHANCE) for i in range(24)]
        results = await asyncio.gather(*(client.submit(j) for j in jobs))
        for j, result in zip(jobs, results, strict=True):
            np.testing.assert_array_equal(result.image, j.pixels)
            np.testing.assert_array_equal(result.uncertainty, j.pixels[0])
        assert max(r.batch_size for r in results) > 1  # jobs of one API process share batches
        assert client.depth() == 0

    run(echo, scenario, max_queue=64)


def test_full_queue_is_429_with_retry_after_and_cancelled_jobs_never_run() -> None:
    gate = Gate()

    async def scenario(client: IpcQueue, server: ModelServer) -> None:
        running = asyncio.ensure_future(client.submit(job(0)))
        await until(gate.started.is_set)
        waiting = asyncio.ensure_future(client.submit(job(1)))
        await until(lambda: server.queue.depth() == 1)
        with pytest.raises(QueueFull) as refused:
            await client.submit(job(2))
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        waiting.cancel()  # the client went away while its job waited
        await until(lambda: server.queue.depth() == 0)
        gate.release.set()
        assert (await running).image is not None
        assert (await client.submit(job(3))).image is not None
        assert gate.seen == ["r0", "r3"]

    run(gate, scenario, max_queue=1, max_batch_size=1)


def test_deadline_gives_504_and_the_expired_job_is_dropped() -> None:
    gate = Gate()

    async def scenario(client: IpcQueue, server: ModelServer) -> None:
        blocker = asyncio.ensure_future(client.submit(job(0)))
        await until(gate.started.is_set)
        with pytest.raises(DeadlineExceeded):
            await client.submit(job(1, timeout_s=0.2))
        gate.release.set()
        await blocker
        await until(lambda: server.queue.depth() == 0 and server.queue.in_flight == 0)
        assert gate.seen == ["r0"]

    run(gate, scenario, max_batch_size=1)


def test_lost_model_process_fails_in_flight_jobs_at_once_and_readiness_says_why() -> None:
    gate = Gate()

    async def scenario(client: IpcQueue, server: ModelServer) -> None:
        assert await client.readiness() == (True, "ok")
        in_flight = asyncio.ensure_future(client.submit(job(0)))
        await until(gate.started.is_set)
        clock = time.monotonic()
        await server.close(0.0)  # as if the model process died
        with pytest.raises(BackendUnavailable) as failed:
            await in_flight
        assert time.monotonic() - clock < 2.0 and failed.value.retry_after_s
        await until(lambda: not client.connected)
        ready, reason = await client.readiness()
        assert not ready and "model process" in reason
        with pytest.raises(BackendUnavailable):
            await client.submit(job(1))
        gate.release.set()

    run(gate, scenario)


def test_batch_failure_and_foreign_shapes_are_errors_not_hangs() -> None:
    def broken(jobs: Sequence[Job]) -> list[JobResult]:
        raise RuntimeError("model exploded")

    async def scenario(client: IpcQueue, _server: ModelServer) -> None:
        with pytest.raises(InferenceFailed):
            await client.submit(job(0))
        odd = Job("odd", Task.ENHANCE, np.zeros((3, 8, 8), np.uint8), time.time() + 5)
        client.working_size = None  # let the foreign shape through to the model process
        with pytest.raises(InferenceFailed):
            await client.submit(odd)

    run(broken, scenario)


def test_stop_waits_for_replies_in_flight() -> None:
    gate = Gate()

    async def scenario(client: IpcQueue, _server: ModelServer) -> None:
        in_flight = asyncio.ensure_future(client.submit(job(0)))
        await until(gate.started.is_set)
        stopping = asyncio.ensure_future(client.stop(5.0))
        await until(lambda: not client.accepting)
        with pytest.raises(BackendUnavailable):
            await client.submit(job(1))  # refused while draining
        gate.release.set()
        assert (await in_flight).image is not None
        await stopping

    run(gate, scenario)
