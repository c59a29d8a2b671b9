"""Crash recovery, poison entries, slow batches and Redis outages (in-process workers, real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from service.queue.base import BackendUnavailable, InferenceFailed, QueueError
from service.queue.redis_protocol import GROUP, StreamNames
from service.worker import Worker
from tests.redis.conftest import RedisServer, wait_for
from tests.redis.helpers import SIZE, EchoRunner, SimulatedCrash, make_job, worker_thread
from tests.redis.test_redis_queue import make_queue, ready, wait_async

NAMES = StreamNames("fundus")


def test_failing_job_is_isolated_and_dead_lettered(redis_server: RedisServer) -> None:
    """A job that makes the model raise fails alone (dead letter + error); its batch mates succeed."""
    runner = EchoRunner(fail_on={"poison"})

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            await wait_async(lambda: ready(queue), 10, "readiness")
            jobs = [make_job(name) for name in ("a", "poison", "b", "c")]
            outcomes = await asyncio.gather(*(queue.submit(job) for job in jobs), return_exceptions=True)
            assert isinstance(outcomes[1], InferenceFailed)
            assert "dead-letter" in outcomes[1].message
            assert all(not isinstance(outcome, BaseException) for i, outcome in enumerate(outcomes) if i != 1)
        finally:
            await queue.stop(1)

    with worker_thread(redis_server.url, runner, max_batch_size=4, max_batch_wait_ms=200) as worker:
        asyncio.run(scenario())
    assert worker.metrics.registry.get_sample_value("fundus_worker_dead_lettered_total") == 1
    assert worker.metrics.registry.get_sample_value("fundus_worker_jobs_total", {"outcome": "ok"}) == 3
    client = redis_server.client()
    dead = client.xrange(NAMES.dead_letters)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"rid"] == b"poison" and b"ValueError" in fields[b"reason"]
    assert b"px" not in fields  # dead letters never keep pixels
    assert client.xlen(NAMES.requests) == 0


def test_crashing_entry_goes_to_dead_letters_after_max_deliveries(redis_server: RedisServer) -> None:
    """An entry that kills every worker that takes it is retried K times, then dead-lettered with a reply."""
    runner = EchoRunner(crash_on={"killer"})
    options: dict[str, Any] = {
        "claim_idle_ms": 200,
        "max_deliveries": 2,
        "heartbeat_ttl_s": 0.6,
        "janitor_interval_s": 0.05,
    }

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            outcome: list[Any] = []
            workers_seen = 0
            task: asyncio.Task[Any] | None = None
            # Successive workers each take the entry and die, until one dead-letters it instead of running it.
            while task is None or not task.done():
                worker = Worker(redis_server.url, runner, **options)
                thread = threading.Thread(target=_run_catching, args=(worker,), daemon=True)
                thread.start()
                workers_seen += 1
                if task is None:
                    await wait_async(lambda: ready(queue), 10, "readiness")
                    task = asyncio.create_task(queue.submit(make_job("killer", timeout_s=30)))
                    task.add_done_callback(lambda t: outcome.append(t.exception() or t.result()))
                while thread.is_alive() and not task.done():
                    await asyncio.sleep(0.02)  # polling period
                worker.stop()
                thread.join(10)
                assert workers_seen <= 5, "entry never dead-lettered"
            error = outcome[0]
            assert isinstance(error, InferenceFailed) and "dead-letter" in error.message
        finally:
            await queue.stop(1)

    asyncio.run(scenario())
    assert runner.runs["killer"] == 2  # exactly max_deliveries attempts, then no more runs
    client = redis_server.client()
    dead = client.xrange(NAMES.dead_letters)
    assert len(dead) == 1 and dead[0][1][b"deliveries"] == b"3"
    assert client.xlen(NAMES.requests) == 0
    assert client.xpending(NAMES.requests, GROUP)["pending"] == 0


def _run_catching(worker: Worker) -> None:
    with contextlib.suppress(SimulatedCrash):  # the simulated crash ends the "process"
        worker.run()


def test_orphaned_batch_is_reclaimed_by_another_worker(redis_server: RedisServer) -> None:
    """A worker that dies holding a batch: a live worker reclaims and answers every job exactly once."""
    crashing = EchoRunner(crash_on={"j0"})
    healthy = EchoRunner()
    options: dict[str, Any] = {"claim_idle_ms": 300, "janitor_interval_s": 0.05, "heartbeat_ttl_s": 0.6}

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            with worker_thread(
                redis_server.url, crashing, max_batch_size=4, max_batch_wait_ms=300, **options
            ) as w:
                await wait_async(lambda: ready(queue), 10, "readiness")
                tasks = [asyncio.create_task(queue.submit(make_job(f"j{i}", timeout_s=20))) for i in range(4)]
                await wait_async(lambda: _dead(w), 10, "the first worker to crash with its batch")
            client = redis_server.client()
            assert client.xpending(NAMES.requests, GROUP)["pending"] >= 1  # the dead worker's batch
            clock = time.monotonic()
            with worker_thread(redis_server.url, healthy, max_batch_size=4, **options) as survivor:
                results = await asyncio.gather(*tasks)
            reclaimed = survivor.metrics.registry.get_sample_value("fundus_worker_reclaimed_total")
            assert reclaimed is not None and reclaimed >= 1
            assert time.monotonic() - clock < 10
            assert [r.image is not None for r in results] == [True] * 4
        finally:
            await queue.stop(1)
        assert queue.stats["duplicate_replies"] == 0

    asyncio.run(scenario())
    assert healthy.runs == {"j0": 1, "j1": 1, "j2": 1, "j3": 1}


async def _dead(worker: Worker) -> bool:
    return not worker.thread.is_alive()  # type: ignore[attr-defined]


def test_slow_batch_is_not_stolen_from_a_live_worker(redis_server: RedisServer) -> None:
    """A batch running longer than claim_idle stays with its live worker (heartbeat re-claims it)."""
    slow_started = threading.Event()
    slow = EchoRunner(delay_s=1.5, started=slow_started)
    other = EchoRunner()
    options: dict[str, Any] = {"claim_idle_ms": 400, "janitor_interval_s": 0.05, "heartbeat_ttl_s": 0.3}

    async def scenario() -> None:
        queue = make_queue(redis_server.url)
        await queue.start()
        try:
            with worker_thread(redis_server.url, slow, max_batch_size=2, max_batch_wait_ms=200, **options):
                await wait_async(lambda: ready(queue), 10, "readiness")
                tasks = [asyncio.create_task(queue.submit(make_job(f"s{i}"))) for i in range(2)]
                await wait_async(lambda: _is_set(slow_started), 10, "the slow batch to start")
                with worker_thread(redis_server.url, other, **options):
                    await asyncio.gather(*tasks)
        finally:
            await queue.stop(1)
        assert queue.stats["duplicate_replies"] == 0

    asyncio.run(scenario())
    assert slow.runs == {"s0": 1, "s1": 1}
    assert other.runs == {}


async def _is_set(event: threading.Event) -> bool:
    return event.is_set()


def test_redis_restart_gives_503_then_recovers_by_itself(redis_server: RedisServer) -> None:
    runner = EchoRunner(delay_s=0.02)
    options: dict[str, Any] = {"heartbeat_ttl_s": 0.6}

    async def scenario() -> None:
        queue = make_queue(redis_server.url, outage_grace_s=1.0)
        await queue.start()
        try:
            await wait_async(lambda: ready(queue), 10, "readiness")
            assert (await queue.submit(make_job("before"))).image is not None
            load = [asyncio.create_task(queue.submit(make_job(f"l{i}"))) for i in range(6)]
            redis_server.stop()
            # During the outage: fast 503s and a readiness reason.
            clock = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await queue.submit(make_job("during"))
            assert time.monotonic() - clock < 3.0
            ok, reason = await queue.readiness()
            assert not ok and "redis unreachable" in reason
            # Jobs in flight either completed or got an explicit error; none hangs to its deadline.
            clock = time.monotonic()
            outcomes = await asyncio.gather(*load, return_exceptions=True)
            assert time.monotonic() - clock < 8.0
            assert all(isinstance(o, QueueError) or getattr(o, "image", None) is not None for o in outcomes)
            redis_server.start()  # same port, empty data set
            await wait_async(lambda: ready(queue), 15, "readiness after the restart")
            result = await queue.submit(make_job("after"))
            assert result.image is not None
        finally:
            await queue.stop(1)

    with worker_thread(redis_server.url, runner, **options):
        asyncio.run(scenario())
    assert runner.runs["after"] == 1


def test_password_protected_redis(tmp_path: Any) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        wrong = server.url.replace("s3cret", "wrong")

        async def scenario() -> None:
            queue = make_queue(wrong)
            await queue.start()
            try:
                ok, reason = await queue.readiness()
                assert not ok and "s3cret" not in reason and "wrong" not in reason
                assert "***" in reason
            finally:
                await queue.stop(0)
            good = make_queue(server.url)
            await good.start()
            try:
                await wait_async(lambda: ready(good), 10, "readiness with the password")
                assert (await good.submit(make_job("authed"))).image is not None
            finally:
                await good.stop(1)

        with worker_thread(server.url, EchoRunner()):
            asyncio.run(scenario())
        wait_for(lambda: server.client().xlen(NAMES.requests) == 0, 5, "an empty stream")
    finally:
        server.stop()


def test_a_base64_password_with_a_slash_works_through_the_password_setting(tmp_path: Any) -> None:
    """A generated password like ``openssl rand -base64`` gives may hold '/', '+' and '=': inside
    FUNDUS_REDIS_URL it breaks the URL; FUNDUS_REDIS_PASSWORD takes it as it is."""
    import redis as redis_client

    from service.queue.redis_backend import RedisQueue
    from service.settings import Settings
    from service.worker import WorkerSettings, worker_from_settings

    password = "q0/Xy+Zt9/Lk=="
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        raw = f"redis://:{password}@127.0.0.1:{server.port}/0"
        with pytest.raises((ValueError, redis_client.exceptions.RedisError)):
            redis_client.Redis.from_url(raw, socket_timeout=2).ping()
        plain_url = f"redis://127.0.0.1:{server.port}/0"
        settings = Settings(_env_file=None, redis_url=plain_url, redis_password=password)  # type: ignore[call-arg]
        worker_settings = WorkerSettings(
            _env_file=None,
            redis_url=plain_url,
            redis_password=password,
            max_batch_wait_ms=5.0,  # type: ignore[call-arg]
        )
        worker = worker_from_settings(worker_settings, EchoRunner(), device="cpu", model_version="test")
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()

        async def scenario() -> None:
            queue = RedisQueue(settings, working_size=SIZE, monitor_interval_s=0.1)
            await queue.start()
            try:
                await wait_async(lambda: ready(queue), 10, "readiness with the password")
                assert (await queue.submit(make_job("with-slash"))).image is not None
            finally:
                await queue.stop(1)

        try:
            asyncio.run(scenario())
        finally:
            worker.stop()
            thread.join(timeout=30)
    finally:
        server.stop()


@pytest.mark.parametrize("stall_s", [2.6, 4.0])
def test_a_redis_stall_never_answers_503_for_a_job_that_then_runs(
    redis_server: RedisServer, stall_s: float
) -> None:
    """Redis frozen (SIGSTOP) while a job is submitted: the old answer was 503 + Retry-After after the
    2 s command timeout while Redis still queued the job, so a retrying client had its image processed
    twice. Now the API waits for the (idempotent) admit to be answered: the job runs once and its
    answer is returned, and submitting the same request id again does not run it twice."""
    import os
    import signal as signals

    runner = EchoRunner()
    assert redis_server.process is not None
    pid = redis_server.process.pid

    async def scenario() -> None:
        queue = make_queue(redis_server.url, command_timeout_s=2.0)
        await queue.start()
        try:
            await wait_async(lambda: ready(queue), 10, "readiness")
            os.kill(pid, signals.SIGSTOP)
            asyncio.get_running_loop().call_later(stall_s, os.kill, pid, signals.SIGCONT)
            try:
                result = await queue.submit(make_job("stalled", timeout_s=20.0))
            finally:
                os.kill(pid, signals.SIGCONT)
            assert result.image is not None
            with pytest.raises(QueueError) as retried:  # a client retry with the same id
                await queue.submit(make_job("stalled", timeout_s=5.0))
            assert retried.value.status_code == 409
        except QueueError as exc:
            raise AssertionError(f"answered {exc.status_code} {exc.code}") from None
        finally:
            await queue.stop(1)

    with worker_thread(redis_server.url, runner, max_batch_wait_ms=5.0):
        asyncio.run(scenario())
    assert runner.runs["stalled"] == 1, runner.runs
