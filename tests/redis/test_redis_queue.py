"""RedisQueue + Worker in one process against a real redis-server (deterministic stand-in model)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    QueueFull,
    Task,
)
from service.queue.redis_backend import RedisQueue
from service.queue.redis_protocol import GROUP, StreamNames, decode_reply, encode_request
from tests.redis.conftest import RedisServer, wait_for
from tests.redis.helpers import SIZE, EchoRunner, make_job, worker_thread

NAMES = StreamNames("fundus")


def make_queue(url: str, **options: Any) -> RedisQueue:
    options.setdefault("max_queue", 64)
    options.setdefault("request_timeout_s", 20.0)
    options.setdefault("working_size", SIZE)
    options.setdefault("monitor_interval_s", 0.1)
    return RedisQueue(url, **options)


async def wait_async(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)  # polling period


async def ready(queue: RedisQueue) -> bool:
    ok, _ = await queue.readiness()
    return ok


def test_round_trip_batches_and_answers_each_job_once(redis_server: RedisServer) -> None:
    runner = EchoRunner(delay_s=0.05)

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            await wait_async(lambda: ready(queue), 10, "readiness")
            jobs = [
                make_job(f"r{i}", seed=i, task=Task.ENHANCE if i % 2 else Task.SEGMENT) for i in range(12)
            ]
            results = await asyncio.gather(*(queue.submit(job) for job in jobs))
            for job, result in zip(jobs, results, strict=True):
                if job.task is Task.ENHANCE:
                    np.testing.assert_array_equal(result.image, 255 - job.pixels)
                    assert result.vessels is None
                else:
                    np.testing.assert_array_equal(result.vessels, job.pixels[0])
                    assert result.image is None
            assert max(result.batch_size for result in results) > 1
            assert queue.stats["answered"] == 12 and queue.stats["duplicate_replies"] == 0
        finally:
            await queue.stop(5)

    with worker_thread(redis_server.url, runner, max_batch_size=4, max_batch_wait_ms=50):
        asyncio.run(scenario())
    assert sorted(runner.runs) == sorted(f"r{i}" for i in range(12))
    assert all(count == 1 for count in runner.runs.values())
    assert all(len(batch) <= 4 for batch in runner.batches)
    client = redis_server.client()
    assert client.xlen(NAMES.requests) == 0  # answered entries are acked and deleted
    assert client.xpending(NAMES.requests, GROUP)["pending"] == 0


def test_readiness_tracks_worker_heartbeat(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        registry = CollectorRegistry()
        queue.register_metrics(registry)
        await queue.start()
        try:
            ok, reason = await queue.readiness()
            assert not ok and "no live worker" in reason
            assert registry.get_sample_value("fundus_workers_alive") == 0
            with pytest.raises(BackendUnavailable):
                await queue.submit(make_job("early"))
            with worker_thread(redis_server.url, EchoRunner(), heartbeat_ttl_s=2.0) as worker:
                await wait_async(lambda: ready(queue), 10, "a live worker")
                assert worker.running
                assert registry.get_sample_value("fundus_workers_alive") == 1
            # A clean stop withdraws the heartbeat at once.
            await wait_async(lambda: _not(ready(queue)), 10, "readiness to drop after the worker stopped")
        finally:
            await queue.stop(1)

    asyncio.run(scenario())


async def _not(awaitable: Any) -> bool:
    return not await awaitable


def test_backpressure_rejects_beyond_global_depth(redis_server: RedisServer) -> None:
    """Two API processes share one limit; the third job is refused with 429 and Retry-After."""
    client = redis_server.client()
    client.set(NAMES.heartbeat("idle"), "{}", ex=60)  # a worker that is alive but not consuming
    client.zadd(NAMES.workers, {"idle": time.time()})

    async def scenario() -> None:
        first, second = make_queue(redis_server.url, max_queue=2), make_queue(redis_server.url, max_queue=2)
        await first.start()
        await second.start()
        try:
            waiting = [
                asyncio.create_task(first.submit(make_job("a"))),
                asyncio.create_task(second.submit(make_job("b"))),
            ]
            await wait_async(lambda: _length_is(client, 2), 5, "two queued entries")
            with pytest.raises(QueueFull) as refused:
                await second.submit(make_job("c"))
            assert refused.value.status_code == 429 and refused.value.retry_after_s
            assert client.xlen(NAMES.requests) == 2
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            # Cancelled callers remove their entries (no worker took them), freeing the slots.
            await wait_async(lambda: _length_is(client, 0), 5, "abandoned entries to be removed")
        finally:
            await first.stop(1)
            await second.stop(1)

    asyncio.run(scenario())


async def _length_is(client: Any, length: int) -> bool:
    return client.xlen(NAMES.requests) == length


def test_caller_deadline_gives_504_and_removes_the_waiting_entry(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set(NAMES.heartbeat("idle"), "{}", ex=60)
    client.zadd(NAMES.workers, {"idle": time.time()})

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            clock = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await queue.submit(make_job("slow", timeout_s=0.3))
            assert time.monotonic() - clock < 2.0
            await wait_async(lambda: _length_is(client, 0), 5, "the abandoned entry to be deleted")
        finally:
            await queue.stop(1)

    asyncio.run(scenario())


def test_expired_entries_are_never_run(redis_server: RedisServer) -> None:
    """Entries whose deadline passed in the stream get a deadline reply and an ack, never a model run."""
    client = redis_server.client()
    reply_to = NAMES.replies("gone")
    for i in range(3):
        job = make_job(f"old{i}", timeout_s=-1.0)
        client.xadd(
            NAMES.requests,
            encode_request(job, job_id=f"old{i}", reply_to=reply_to, reply_maxlen=100, reply_ttl_s=60),
        )
    fresh = make_job("fresh")
    client.xadd(
        NAMES.requests,
        encode_request(fresh, job_id="fresh", reply_to=reply_to, reply_maxlen=100, reply_ttl_s=60),
    )
    runner = EchoRunner()
    with worker_thread(redis_server.url, runner, max_batch_wait_ms=0):
        wait_for(lambda: client.xlen(reply_to) == 4, 10, "four replies")
        wait_for(lambda: client.xlen(NAMES.requests) == 0, 10, "entries acked and deleted")
    replies = {
        reply.job_id: reply for reply in (decode_reply(fields) for _, fields in client.xrange(reply_to))
    }
    assert set(runner.runs) == {"fresh"}
    assert replies["fresh"].result is not None
    for i in range(3):
        assert isinstance(replies[f"old{i}"].error, DeadlineExceeded)
    assert client.xpending(NAMES.requests, GROUP)["pending"] == 0
