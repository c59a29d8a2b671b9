"""The local model-process queue backend, API side: one Unix-socket connection per API process.

With ``fundus serve --workers N`` every API process decodes, crops and encodes on its own cores and
sends the working-size job to the single model process of the machine (see
:mod:`service.queue.ipc_server`), which batches the jobs of all API processes together. This class
keeps the queue semantics the HTTP layer relies on:

* deadlines: the wait ends at the job's deadline (504) and the model process is told to drop it;
* cancellation: a client that disconnects cancels ``submit``; a ``cancel`` frame drops the job
  before the model runs it;
* admission: the model process owns the one global queue bound, so a full queue is a 429 with the
  model's Retry-After estimate, whichever API process asked;
* failures: while the model process is unreachable (starting, restarting after a crash) ``submit``
  answers 503 at once; jobs in flight when the connection drops fail with 503 at once, never hang.
  The connection is re-established in the background with backoff;
* readiness: a ping answered by the model process with its own readiness (weights loaded and warm,
  batcher running, no model pass stuck);
* shutdown: ``stop`` refuses new jobs and waits for the replies of jobs in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    InferenceQueue,
    Job,
    JobResult,
    QueueError,
)
from service.queue.ipc_protocol import (
    ERROR,
    PONG,
    RESULT,
    Pong,
    cancel_frame,
    decode_answer,
    decode_pong,
    depth_of,
    job_frame,
    kind,
    ping_frame,
    read_frame,
)
from service.queue.redis_protocol import ProtocolError, pixel_bytes

log = logging.getLogger("fundus.queue.ipc")

#: Errors that mean the connection to the model process is gone.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.IncompleteReadError,
    ConnectionError,
    OSError,
    ProtocolError,
)


class IpcQueue(InferenceQueue):
    """Queue backend that forwards jobs to the local model process over a Unix socket.

    Args:
        socket_path: the model process's socket (``FUNDUS_MODEL_SOCKET``, set by ``fundus serve``).
        working_size: S of the uint8 [3, S, S] jobs; ``None`` accepts any.
        ping_timeout_s: how long a readiness probe waits for the model process.
        connect_timeout_s: how long one connection attempt may take.
        reconnect_max_s: longest pause between connection attempts.
        retry_after_s: ``Retry-After`` of the 503s given while the model process is unreachable.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        working_size: int | None = None,
        ping_timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
        reconnect_max_s: float = 0.5,
        retry_after_s: float = 2.0,
    ) -> None:
        self.socket_path = socket_path
        self.working_size = working_size
        self.ping_timeout_s = ping_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.retry_after_s = retry_after_s
        self._waiters: dict[str, asyncio.Future[JobResult | QueueError]] = {}
        self._pings: dict[str, asyncio.Future[Pong]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._depth = 0
        self._reason = "not connected yet"
        self._lost: Counter | None = None
        self.stats = {"submitted": 0, "answered": 0, "late_answers": 0, "lost": 0, "connections": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting in the background; an absent model process is reported, not raised."""
        if self._task is None:
            self._task = asyncio.create_task(self._connection_loop(), name="fundus-ipc-connection")

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new jobs, wait up to ``drain_timeout_s`` for the replies in flight, then disconnect."""
        self._closing = True
        pending = [future for future in self._waiters.values() if not future.done()]
        if pending and drain_timeout_s > 0:
            await asyncio.wait(pending, timeout=drain_timeout_s)
        self._fail_waiters("the service is shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_writer()

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` takes new jobs (false once ``stop`` began)."""
        return not self._closing

    @property
    def connected(self) -> bool:
        """Whether a connection to the model process is open."""
        return self._writer is not None

    # ------------------------------------------------------------------ the interface

    def depth(self) -> int:
        """Jobs waiting in the model process (all API processes together), as last reported."""
        return self._depth

    async def readiness(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        writer = self._writer
        if writer is None:
            return False, f"model process not reachable: {self._reason}"
        ping_id = uuid.uuid4().hex
        future: asyncio.Future[Pong] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        try:
            writer.write(ping_frame(ping_id))
            pong = await asyncio.wait_for(future, timeout=self.ping_timeout_s)
        except TimeoutError:
            return False, f"model process did not answer within {self.ping_timeout_s:g} s"
        except CONNECTION_ERRORS as exc:
            return False, f"model process not reachable: {exc}"
        finally:
            self._pings.pop(ping_id, None)
        self._depth = pong.depth
        return (True, "ok") if pong.ready else (False, f"model process not ready: {pong.reason}")

    async def submit(self, job: Job) -> JobResult:
        if self._closing:
            raise BackendUnavailable("the service is not accepting work (shutting down)", retry_after_s=1)
        if job.expired():
            raise DeadlineExceeded("request deadline passed before the job was queued")
        if self.working_size is not None and job.pixels.nbytes != pixel_bytes(self.working_size):
            raise ValueError(
                f"job pixels {tuple(job.pixels.shape)} do not match working size {self.working_size}"
            )
        writer = self._writer
        if writer is None:
            raise BackendUnavailable(
                f"the model process is not reachable ({self._reason})", retry_after_s=self.retry_after_s
            )
        job_id = uuid.uuid4().hex  # request ids may repeat across clients; this one never does
        frame = job_frame(job, job_id)
        future: asyncio.Future[JobResult | QueueError] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        try:
            writer.write(frame)
            await writer.drain()
        except CONNECTION_ERRORS:
            self._waiters.pop(job_id, None)
            raise BackendUnavailable(
                "lost the connection to the model process; retry", retry_after_s=self.retry_after_s
            ) from None
        except BaseException:
            self._waiters.pop(job_id, None)
            self._cancel_remote(job_id)
            raise
        self.stats["submitted"] += 1
        try:
            answer = await asyncio.wait_for(
                asyncio.shield(future), timeout=max(0.0, job.deadline - time.time())
            )
        except TimeoutError:
            self._cancel_remote(job_id)
            raise DeadlineExceeded("request deadline passed while waiting for the model") from None
        except asyncio.CancelledError:
            self._cancel_remote(job_id)  # the caller went away: the model process drops the job
            raise
        finally:
            self._waiters.pop(job_id, None)
        if isinstance(answer, QueueError):
            raise answer
        return answer

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add ``fundus_model_process_up`` and ``fundus_model_process_lost_total`` to ``registry``."""
        up = Gauge(
            "fundus_model_process_up",
            "1 while this API process is connected to the local model process",
            registry=registry,
        )
        up.set_function(lambda: 1.0 if self.connected else 0.0)
        self._lost = Counter(
            "fundus_model_process_lost_total",
            "Connections to the local model process that broke (crash, restart)",
            registry=registry,
        )

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self) -> None:
        """Connect, read answers until the connection breaks, fail what was in flight, reconnect."""
        backoff = 0.02
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path), timeout=self.connect_timeout_s
                )
            except (OSError, TimeoutError) as exc:
                self._reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                await asyncio.sleep(backoff)  # reconnect pacing
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = 0.02
            self._writer = writer
            self.stats["connections"] += 1
            log.info("connected to the model process", extra={"socket": self.socket_path})
            try:
                await self._read_answers(reader)
                self._reason = "the model process closed the connection"
            except CONNECTION_ERRORS as exc:
                self._reason = f"connection lost ({type(exc).__name__})"
            finally:
                self._writer = None
                writer.close()
            if not self._closing:
                log.warning("lost the model process", extra={"reason": self._reason})
                if self._lost is not None:
                    self._lost.inc()
            self._fail_waiters("lost the model process (it stopped or restarted); retry")

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        while True:
            fields = await read_frame(reader)
            depth = depth_of(fields)
            if depth is not None:
                self._depth = depth
            what = kind(fields)
            if what == PONG:
                pong = decode_pong(fields)
                future = self._pings.get(pong.ping_id)
                if future is not None and not future.done():
                    future.set_result(pong)
            elif what in (RESULT, ERROR):
                try:
                    job_id, answer = decode_answer(fields)
                except ProtocolError as exc:
                    log.error("undecodable answer from the model process", extra={"error": str(exc)})
                    continue
                waiter = self._waiters.get(job_id)
                if waiter is None or waiter.done():
                    self.stats["late_answers"] += 1  # the caller gave up (deadline or disconnect)
                    continue
                waiter.set_result(answer)
                self.stats["answered"] += 1
            else:
                log.error("unknown frame from the model process", extra={"kind": what[:32]})

    def _cancel_remote(self, job_id: str) -> None:
        """Best effort: tell the model process to drop ``job_id`` (no wait; nothing if disconnected)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        with contextlib.suppress(*CONNECTION_ERRORS, RuntimeError):
            writer.write(cancel_frame(job_id))

    def _fail_waiters(self, message: str) -> None:
        for future in list(self._waiters.values()):
            if not future.done():
                future.set_result(BackendUnavailable(message, retry_after_s=self.retry_after_s))
                self.stats["lost"] += 1
        for ping in list(self._pings.values()):
            if not ping.done():
                ping.set_exception(ConnectionError(message))

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
