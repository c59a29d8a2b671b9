"""The model process's side of the local IPC queue: a Unix-socket server in front of one micro-batcher.

Every API process of ``fundus serve --workers N`` holds one connection (:mod:`service.queue.ipc_backend`).
Each ``job`` frame becomes a task awaiting :meth:`EmbeddedQueue.submit`, so jobs of all API processes
share batches and the embedded queue's rules hold for all of them: one global bound (429 with
Retry-After), expired jobs never run, a failing batch fails only its own jobs. A ``cancel`` frame, or
the connection closing (the API process exited or crashed), cancels that connection's tasks, and
the batcher drops them before the model runs. Jobs whose shape is not the working size are refused
on arrival, so they cannot fail the batch they would have joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from service.queue.base import InferenceFailed, Job, QueueError
from service.queue.embedded import EmbeddedQueue
from service.queue.ipc_protocol import (
    CANCEL,
    JOB,
    PING,
    error_frame,
    kind,
    pong_frame,
    read_frame,
    result_frame,
    text,
)
from service.queue.redis_protocol import ProtocolError, decode_request

log = logging.getLogger("fundus.model_process")

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


class _Connection:
    """One API process: its writer and the tasks of its jobs still in the queue."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def send(self, frame: bytes) -> None:
        """Write one frame; a vanished API process is not an error (its jobs are being cancelled)."""
        if self.writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(frame)
            await self.writer.drain()

    def cancel(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()


class ModelServer:
    """Serves the jobs of every API process through ``queue``.

    Args:
        queue: the started micro-batcher in front of the model.
        working_size: S of the uint8 [3, S, S] jobs accepted.
        readiness: the model process's own readiness (``(ready, reason)``), answered to pings;
            defaults to the queue's.
    """

    def __init__(
        self, queue: EmbeddedQueue, *, working_size: int, readiness: Readiness | None = None
    ) -> None:
        self.queue = queue
        self.working_size = working_size
        self._readiness = readiness or queue.readiness
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """API processes connected now."""
        return len(self._connections)

    async def start(self, path: str) -> None:
        """Listen on ``path`` (a stale socket file from a crashed predecessor is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve_connection, path=path)
        os.chmod(path, 0o600)  # this user's processes only (the folder is private too)

    async def close(self, drain_timeout_s: float) -> None:
        """Stop listening; wait up to ``drain_timeout_s`` for the API processes to disconnect (they do
        once their own in-flight requests are answered), then cut the rest."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the connection count while API processes drain
        for connection in list(self._connections):
            connection.cancel_all()
            connection.writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1.0)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer)
        self._connections.add(connection)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        log.info("API process connected", extra={"connections": len(self._connections)})
        try:
            while True:
                fields = await read_frame(reader)
                what = kind(fields)
                if what == JOB:
                    await self._accept(connection, fields)
                elif what == CANCEL:
                    connection.cancel(text(fields, b"jid"))
                elif what == PING:
                    task = asyncio.create_task(self._pong(connection, text(fields, b"pid")))
                    connection.tasks[f"ping:{id(task)}"] = task
                    task.add_done_callback(lambda t: connection.tasks.pop(f"ping:{id(t)}", None))
                else:
                    log.warning("unknown frame ignored", extra={"kind": what[:32]})
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the API process closed its end (shutdown, restart or crash)
        except ProtocolError as exc:
            log.error("closing a connection that sent a malformed frame", extra={"error": str(exc)})
        finally:
            connection.cancel_all()
            writer.close()
            self._connections.discard(connection)
            if handler is not None:
                self._handlers.discard(handler)
            log.info("API process disconnected", extra={"connections": len(self._connections)})

    async def _accept(self, connection: _Connection, fields: dict[bytes, bytes]) -> None:
        job_id = text(fields, b"jid")
        try:
            entry = decode_request(fields)
        except ProtocolError as exc:
            if job_id:
                await connection.send(
                    error_frame(job_id, InferenceFailed(f"malformed job: {exc}"), depth=self.queue.depth())
                )
            return
        job = entry.job
        size = self.working_size
        if job.pixels.shape != (3, size, size):
            error = InferenceFailed(f"job pixels {tuple(job.pixels.shape)} are not the working size {size}")
            await connection.send(error_frame(job_id, error, depth=self.queue.depth()))
            return
        task = asyncio.create_task(self._run(connection, job_id, job))
        connection.tasks[job_id] = task

    async def _run(self, connection: _Connection, job_id: str, job: Job) -> None:
        try:
            result = await self.queue.submit(job)
        except asyncio.CancelledError:
            raise  # cancelled by the API process, or its connection closed: nobody waits for an answer
        except QueueError as exc:
            frame = error_frame(job_id, exc, depth=self.queue.depth())
        except Exception:
            log.exception("job failed unexpectedly")
            frame = error_frame(
                job_id,
                InferenceFailed("the model process failed on this job; retry", retry_after_s=1),
                depth=self.queue.depth(),
            )
        else:
            frame = result_frame(job_id, result, depth=self.queue.depth())
        finally:
            connection.tasks.pop(job_id, None)
        await connection.send(frame)

    async def _pong(self, connection: _Connection, ping_id: str) -> None:
        try:
            ready, reason = await self._readiness()
        except Exception as exc:  # a broken readiness check is an unready model process, not a crash
            ready, reason = False, f"readiness check failed: {type(exc).__name__}"
        await connection.send(pong_frame(ping_id, ready=ready, reason=reason, depth=self.queue.depth()))
