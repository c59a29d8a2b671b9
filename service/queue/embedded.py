"""The in-process micro-batcher: the default queue of ``fundus serve``, no other process needed.

Each submitted job becomes a future in a bounded FIFO. One controller task forms batches: a batch
leaves as soon as it holds ``max_batch_size`` live jobs, or when its oldest job has waited
``max_wait_s`` (the timer starts at that job's arrival, so jobs that queued while the previous batch
ran leave at once). When the model is idle and no other request is on its way (the API announces
requests while it decodes and crops them), the batch runs at once instead of waiting for the timer:
a lone request pays no batching delay. Exactly one batch is in flight; the model runs in a dedicated
worker thread so the event loop keeps serving HTTP. Jobs whose caller went away (cancelled future) or
whose deadline passed are dropped before the model runs. A failing batch fails only its own jobs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    InferenceFailed,
    InferenceQueue,
    Job,
    JobResult,
    QueueFull,
)

log = logging.getLogger("fundus.queue")

BatchFunction = Callable[[Sequence[Job]], list[JobResult]]


@dataclass
class _Entry:
    job: Job
    future: asyncio.Future[JobResult]
    arrived: float  # time.monotonic() at enqueue


class EmbeddedQueue(InferenceQueue):
    """Micro-batching queue in front of a synchronous batch function.

    Args:
        run_batch: runs a list of jobs through the model and returns one result per job, in order
            (normally ``ModelRunner.run_jobs``); called in a worker thread.
        max_batch_size: jobs per model pass at most.
        max_wait_s: longest the oldest job waits for the batch to fill.
        max_queue: jobs allowed to wait (not counting the batch being run); beyond that → QueueFull.
        on_batch_failure: called once per failed model pass (metrics).
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch_failure: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be ≥ 1 and max_wait_s ≥ 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch_failure = on_batch_failure
        self._pending: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._in_flight = 0
        self._last_batch_s = 0.0
        self._announced: dict[str, int] = {}

    def announce(self, request_id: str) -> None:
        """A request will submit a job soon (it is being preprocessed): worth waiting for."""
        self._announced[request_id] = self._announced.get(request_id, 0) + 1

    def retract(self, request_id: str) -> None:
        """The announced request will not submit after all (error, or already submitted: then a no-op)."""
        if self._consume(request_id):
            self._wakeup.set()

    def _consume(self, request_id: str) -> bool:
        count = self._announced.get(request_id, 0)
        if count <= 0:
            return False
        if count == 1:
            del self._announced[request_id]
        else:
            self._announced[request_id] = count - 1
        return True

    @property
    def incoming(self) -> int:
        """Announced requests that have not submitted yet."""
        return sum(self._announced.values())

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fundus-model")
        self._task = asyncio.create_task(self._serve(), name="fundus-batcher")

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new jobs, let queued and running ones finish within ``drain_timeout_s``, fail the rest."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=max(0.0, drain_timeout_s))
            except TimeoutError:
                log.warning("drain timeout; failing queued jobs", extra={"queued": self.depth()})
                self._task.cancel()
                for entry in self._pending:
                    if not entry.future.done():
                        entry.future.set_exception(
                            BackendUnavailable("service is shutting down", retry_after_s=1)
                        )
                self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return sum(1 for entry in self._pending if not entry.future.done())

    @property
    def in_flight(self) -> int:
        """Jobs in the batch the model is running now."""
        return self._in_flight

    async def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if self._task is None:
            return False, "batcher not started"
        if self._task.done():
            return False, "batcher stopped unexpectedly"
        return True, "ok"

    def retry_after_s(self) -> float:
        """Rough time until a queue slot frees: the batches ahead times the last batch's duration."""
        batches_ahead = math.ceil((self.depth() + 1) / self.max_batch_size)
        return max(1.0, batches_ahead * max(self._last_batch_s, self.max_wait_s))

    async def submit(self, job: Job) -> JobResult:
        if self._stopping or self._task is None or self._task.done():
            raise BackendUnavailable(
                "the service is not accepting work (starting or shutting down)", retry_after_s=1
            )
        if job.expired():
            raise DeadlineExceeded("request deadline passed before the job was queued")
        if self.depth() >= self.max_queue:
            raise QueueFull(
                f"inference queue is full ({self.max_queue} waiting)", retry_after_s=self.retry_after_s()
            )
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._consume(job.request_id)
        self._pending.append(_Entry(job=job, future=future, arrived=time.monotonic()))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(
                asyncio.shield(future), timeout=max(0.0, job.deadline - time.time())
            )
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded("request deadline passed while waiting for the model") from None
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: the batcher skips this job
            raise

    def _drop_done(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if any(entry.future.done() for entry in self._pending):
            self._pending = deque(entry for entry in self._pending if not entry.future.done())

    async def _wait_for_batch(self) -> None:
        """Return when a batch should leave: full, nothing else on its way, oldest waited ``max_wait_s``,
        or stopping."""
        while not self._stopping:
            self._drop_done()
            if not self._pending or len(self._pending) >= self.max_batch_size or self.incoming == 0:
                return
            remaining = self._pending[0].arrived + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        now = time.time()
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if entry.future.done():
                continue
            if entry.job.expired(now):
                entry.future.set_exception(DeadlineExceeded("request deadline passed before the model ran"))
                continue
            batch.append(entry)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_done()
            if not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight = len(batch)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [e.job for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(batch)} jobs"
                    )
            except asyncio.CancelledError:
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(
                            BackendUnavailable("service stopped during the model pass")
                        )
                raise
            except Exception:
                log.exception("model pass failed", extra={"batch_size": len(batch)})
                if self._on_batch_failure is not None:
                    self._on_batch_failure()
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(
                            InferenceFailed(
                                "the model failed on this request's batch; retry", retry_after_s=1
                            )
                        )
            else:
                for entry, result in zip(batch, results, strict=True):
                    if not entry.future.done():
                        entry.future.set_result(result)
            finally:
                self._in_flight = 0
                self._last_batch_s = time.perf_counter() - started
