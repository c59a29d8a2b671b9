"""The embedded micro-batcher on its own, with a controllable batch function (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

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


def job(name: str, timeout_s: float = 10.0) -> Job:
    return Job(
        request_id=name,
        task=Task.ENHANCE,
        pixels=np.zeros((3, 4, 4), np.uint8),
        deadline=time.time() + timeout_s,
    )


class Recorder:
    """Batch function that records job ids per batch; optionally blocks or fails."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.fail_first = fail_first
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, jobs: Sequence[Job]) -> list[JobResult]:
        self.batches.append([j.request_id for j in jobs])
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise RuntimeError("gate never opened")
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom")
        return [JobResult(None, None, 0.0, 0.0, len(jobs)) for _ in jobs]


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_batch_leaves_when_full() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        queue = EmbeddedQueue(recorder, max_batch_size=3, max_wait_s=30.0, max_queue=10)
        await queue.start()
        for i in range(3):
            queue.announce(f"j{i}")
        results = await asyncio.gather(*(queue.submit(job(f"j{i}")) for i in range(3)))
        assert [r.batch_size for r in results] == [3, 3, 3]
        assert recorder.batches == [["j0", "j1", "j2"]]
        await queue.stop(1.0)

    run(scenario())


def test_batch_leaves_after_max_wait_from_first_arrival() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        queue = EmbeddedQueue(recorder, max_batch_size=8, max_wait_s=0.1, max_queue=10)
        await queue.start()
        for name in ("a", "b", "never-comes"):
            queue.announce(name)
        started = time.monotonic()
        results = await asyncio.gather(queue.submit(job("a")), queue.submit(job("b")))
        assert time.monotonic() - started >= 0.1
        assert [r.batch_size for r in results] == [2, 2]
        await queue.stop(1.0)

    run(scenario())


def test_idle_model_runs_a_lone_job_at_once() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        queue = EmbeddedQueue(recorder, max_batch_size=8, max_wait_s=30.0, max_queue=10)
        await queue.start()
        result = await asyncio.wait_for(queue.submit(job("alone")), timeout=5.0)
        assert result.batch_size == 1
        queue.announce("a")
        queue.announce("gave-up")
        waiting = asyncio.create_task(queue.submit(job("a")))
        await until(lambda: queue.depth() == 1)
        assert not waiting.done()
        queue.retract("gave-up")  # nothing else is coming: run now, not after 30 s
        assert (await asyncio.wait_for(waiting, timeout=5.0)).batch_size == 1
        assert queue.incoming == 0
        await queue.stop(1.0)

    run(scenario())


def test_failing_batch_fails_only_its_jobs_and_batcher_lives_on() -> None:
    async def scenario() -> None:
        recorder = Recorder(fail_first=True)
        failures: list[int] = []
        queue = EmbeddedQueue(
            recorder,
            max_batch_size=2,
            max_wait_s=5.0,
            max_queue=10,
            on_batch_failure=lambda: failures.append(1),
        )
        await queue.start()
        for name in "abcd":
            queue.announce(name)
        outcomes = await asyncio.gather(
            queue.submit(job("a")), queue.submit(job("b")), return_exceptions=True
        )
        assert all(isinstance(o, InferenceFailed) for o in outcomes)
        assert failures == [1]
        later = await asyncio.gather(queue.submit(job("c")), queue.submit(job("d")))
        assert [r.batch_size for r in later] == [2, 2]
        assert (await queue.readiness())[0]
        await queue.stop(1.0)

    run(scenario())


def test_cancelled_and_expired_jobs_never_reach_the_model() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.gate.clear()
        queue = EmbeddedQueue(recorder, max_batch_size=4, max_wait_s=0.0, max_queue=10)
        await queue.start()
        first = asyncio.create_task(queue.submit(job("running")))
        await until(recorder.entered.is_set)
        gone = asyncio.create_task(queue.submit(job("gone")))
        expired = asyncio.create_task(queue.submit(job("expired", timeout_s=0.05)))
        await until(lambda: queue.depth() == 2)
        gone.cancel()
        with pytest.raises(DeadlineExceeded):
            await expired
        kept = asyncio.create_task(queue.submit(job("kept")))
        await until(lambda: queue.depth() == 1)
        recorder.gate.set()
        await first
        await kept
        assert recorder.batches == [["running"], ["kept"]]
        await queue.stop(1.0)

    run(scenario())


def test_bounded_queue_rejects_with_retry_after() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.gate.clear()
        queue = EmbeddedQueue(recorder, max_batch_size=1, max_wait_s=0.0, max_queue=1)
        await queue.start()
        running = asyncio.create_task(queue.submit(job("running")))
        await until(recorder.entered.is_set)
        waiting = asyncio.create_task(queue.submit(job("waiting")))
        await until(lambda: queue.depth() == 1)
        with pytest.raises(QueueFull) as refused:
            await queue.submit(job("refused"))
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        recorder.gate.set()
        await asyncio.gather(running, waiting)
        await queue.stop(1.0)

    run(scenario())


def test_stop_drains_in_flight_and_refuses_new_work() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.gate.clear()
        queue = EmbeddedQueue(recorder, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        await queue.start()
        jobs = [asyncio.create_task(queue.submit(job(f"j{i}"))) for i in range(3)]
        await until(recorder.entered.is_set)
        stopping = asyncio.create_task(queue.stop(5.0))
        await until(lambda: not stopping.done() and queue._stopping)
        with pytest.raises(BackendUnavailable):
            await queue.submit(job("late"))
        assert (await queue.readiness())[0] is False
        recorder.gate.set()
        await stopping
        assert [r.batch_size for r in await asyncio.gather(*jobs)] == [1, 1, 1]

    run(scenario())


def test_stop_timeout_fails_what_is_left() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        recorder.gate.clear()
        queue = EmbeddedQueue(recorder, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        await queue.start()
        jobs = [asyncio.create_task(queue.submit(job(f"j{i}"))) for i in range(2)]
        await until(recorder.entered.is_set)
        await queue.stop(0.05)
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        assert all(isinstance(o, BackendUnavailable) for o in outcomes)
        recorder.gate.set()

    run(scenario())
