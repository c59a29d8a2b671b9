"""The Redis Streams queue backend, API side: admission, enqueue, and one reply reader per process.

``submit`` runs one Lua script that checks the global backlog (``XLEN`` of the request stream, which
workers keep exact by XACK + XDEL of every answered entry) against ``max_queue`` and XADDs the entry,
atomically across every API replica → :class:`QueueFull` (429) when full. The entry names this
process's reply stream; a single background task XREADs it (BLOCK ≤ 1 s, on its own connection
whose socket timeout is longer than the block) and resolves ``{job id: Future}``. A job id is
answered once; later duplicates (an entry re-run after a reclaim) are counted and ignored.

Failure handling:
* Redis unreachable → ``submit`` fails at once with :class:`BackendUnavailable` (503), ``readiness``
  says why, and the reader/monitor reconnect by themselves with backoff.
* Jobs in flight during an outage fail with 503 once it lasts ``outage_grace_s``, or as soon as
  Redis comes back *without their data* (the ``epoch`` key changed: restart without persistence),
  instead of waiting for their deadline.
* No live worker heartbeat → ``readiness`` is false and ``submit`` refuses with 503.
* A caller that gives up (deadline, disconnect) removes its entry if no worker has taken it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    DuplicateRequest,
    InferenceQueue,
    Job,
    JobResult,
    QueueFull,
)
from service.queue.redis_protocol import (
    DEFAULT_BLOCK_MS,
    DEFAULT_PREFIX,
    DEFAULT_REPLY_TTL_S,
    GROUP,
    ProtocolError,
    Reply,
    StreamNames,
    check_working_size,
    decode_reply,
    encode_request,
    pixel_bytes,
)

log = logging.getLogger("fundus.queue.redis")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

# KEYS: request stream, epoch key. ARGV: max backlog, fresh epoch token, then field/value pairs.
# Returns {admitted (0/1), entry id, epoch, backlog after}.
_ADMIT_LUA = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
end
local n = redis.call('XLEN', KEYS[1])
local known = redis.call('GET', KEYS[3])
if known then
  return {2, known, epoch, n}
end
if n >= tonumber(ARGV[1]) then
  return {0, '', epoch, n}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[3], id, 'EX', tonumber(ARGV[3]))
return {1, id, epoch, n + 1}
"""

# KEYS: request stream. ARGV: group, entry id. Deletes the entry only if no worker holds it (not in
# the group's PEL): deleting a pending entry would leave a dangling PEL reference.
_ABANDON_LUA = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(p) == 'table' and p.err == nil and #p > 0 then
  return 0
end
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

ANSWERED_MEMORY = 4096  # job ids remembered to tell a duplicate reply from a stray one


@dataclass
class _Waiter:
    future: asyncio.Future[Reply]
    epoch: str = ""
    entry_id: str = ""


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and readiness messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(response: Any) -> list[Any]:
    """Entries of a single-stream XREAD answer, RESP2 or RESP3 shaped."""
    if not response:
        return []
    if isinstance(response, dict):
        return [entry for entries in response.values() for entry in entries[0]]
    return list(response[0][1])


class RedisQueue(InferenceQueue):
    """Queue backend over Redis Streams; workers are ``fundus worker`` processes anywhere.

    Args:
        url: Redis URL (``redis://``, ``rediss://``, password in the URL), or a ``Settings`` object
            whose ``redis_url``, ``max_queue``, ``request_timeout_s`` (and optional
            ``redis_stream_prefix``) fill the arguments left as ``None``.
        max_queue: global backlog limit (entries waiting or running, all API replicas together).
        request_timeout_s: default request timeout; sizes the reply stream expiry.
        working_size: S of the uint8 [3, S, S] jobs; ``None`` accepts any S within the inline cap.
        stream_prefix: key prefix shared with the workers.
        block_ms: reply reader BLOCK (≤ 1 s; its socket timeout is 5 s longer).
        command_timeout_s: socket timeout of ordinary commands (the longest an unresponsive Redis
            stalls a request).
        monitor_interval_s: how often backlog, worker heartbeats and the epoch are sampled.
        outage_grace_s: in-flight jobs fail with 503 once Redis has been unreachable this long.
        require_worker: refuse jobs (503) while no worker heartbeat is alive.
        retry_after_s: ``Retry-After`` hint for a full queue.
        max_connections: command connection pool size (callers wait for a free one).
    """

    def __init__(
        self,
        url: Any,
        *,
        max_queue: int | None = None,
        request_timeout_s: float | None = None,
        working_size: int | None = None,
        stream_prefix: str | None = None,
        block_ms: int = DEFAULT_BLOCK_MS,
        command_timeout_s: float = 2.0,
        monitor_interval_s: float = 1.0,
        outage_grace_s: float = 5.0,
        require_worker: bool = True,
        retry_after_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        if not isinstance(url, str):
            settings = url
            url = getattr(settings, "redis_connection_url", None) or settings.redis_url
            max_queue = max_queue if max_queue is not None else settings.max_queue
            request_timeout_s = (
                request_timeout_s if request_timeout_s is not None else settings.request_timeout_s
            )
            stream_prefix = stream_prefix or getattr(settings, "redis_stream_prefix", None)
        if not url:
            raise ValueError("a Redis URL is required")
        if max_queue is None or max_queue < 1:
            raise ValueError("max_queue must be ≥ 1")
        if working_size is not None:
            check_working_size(working_size)
        self.url = url
        self.safe_url = redact_url(url)
        self.max_queue = int(max_queue)
        self.request_timeout_s = float(request_timeout_s or 30.0)
        self.working_size = working_size
        self.names = StreamNames(stream_prefix or DEFAULT_PREFIX)
        self.block_ms = max(1, min(int(block_ms), 1000))
        self.command_timeout_s = command_timeout_s
        self.monitor_interval_s = monitor_interval_s
        self.outage_grace_s = outage_grace_s
        self.require_worker = require_worker
        self.retry_after_s = retry_after_s
        self.max_connections = max_connections
        self.api_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reply_stream = self.names.replies(self.api_id)
        self.reply_maxlen = max(200, 2 * self.max_queue)
        self.reply_ttl_s = max(DEFAULT_REPLY_TTL_S, math.ceil(2 * self.request_timeout_s))
        self.stats = {"submitted": 0, "answered": 0, "duplicate_replies": 0, "late_replies": 0, "lost": 0}

        self._waiters: dict[str, _Waiter] = {}
        self._answered: deque[str] = deque(maxlen=ANSWERED_MEMORY)
        self._answered_set: set[str] = set()
        self._cmd: aioredis.Redis | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._reader: aioredis.Redis | None = None
        self._admit: Any = None
        self._abandon: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closing = False
        self._last_reply_id = "0-0"
        self._epoch: str | None = None
        self._depth = 0
        self._backlog = 0
        self._live_workers: int | None = None
        self._redis_error: str | None = "not connected yet"
        self._down_since: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the clients and background tasks; an unreachable Redis is reported, not raised."""
        if self._started:
            return
        self._pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.command_timeout_s,
            socket_timeout=self.command_timeout_s,
            socket_connect_timeout=self.command_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        )
        self._cmd = aioredis.Redis(connection_pool=self._pool)
        self._reader = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.block_ms / 1000 + 5.0,
            socket_connect_timeout=self.command_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._admit = self._cmd.register_script(_ADMIT_LUA)
        self._abandon = self._cmd.register_script(_ABANDON_LUA)
        self._started = True
        with contextlib.suppress(*TRANSIENT_ERRORS, redis.exceptions.ResponseError, TimeoutError):
            await asyncio.wait_for(self._probe(), timeout=self.command_timeout_s + 1.0)
        self._tasks = [
            asyncio.create_task(self._reader_loop(), name="fundus-redis-replies"),
            asyncio.create_task(self._monitor_loop(), name="fundus-redis-monitor"),
        ]
        log.info("redis queue started", extra={"redis": self.safe_url, "reply_stream": self.reply_stream})

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new jobs, wait up to ``drain_timeout_s`` for in-flight replies, then close."""
        self._closing = True
        pending = [w.future for w in self._waiters.values() if not w.future.done()]
        if pending and drain_timeout_s > 0:
            await asyncio.wait(pending, timeout=drain_timeout_s)
        self._fail_waiters(lambda _w: True, "the service is shutting down")
        # The loops check ``_closing`` too: a cancellation that redis-py turns into a timeout error
        # must not keep them alive, and stopping never waits on them for long.
        for task in self._tasks:
            task.cancel()
        tasks = [*self._tasks, *self._background]
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=self.block_ms / 1000 + 2.0)
            if still_running:
                log.warning("background tasks did not stop in time", extra={"count": len(still_running)})
        self._tasks = []
        if self._cmd is not None:
            with contextlib.suppress(*TRANSIENT_ERRORS, redis.exceptions.ResponseError):
                await asyncio.wait_for(self._cmd.delete(self.reply_stream), timeout=self.command_timeout_s)
            await self._cmd.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
        if self._reader is not None:
            await self._reader.aclose()
        self._started = False

    # ------------------------------------------------------------------ the interface

    def depth(self) -> int:
        """Entries waiting for a worker (backlog minus entries being run), as last sampled."""
        return self._depth

    async def readiness(self) -> tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if not self._started:
            return False, "redis queue not started"
        try:
            await asyncio.wait_for(self._probe(), timeout=self.command_timeout_s + 1.0)
        except (*TRANSIENT_ERRORS, redis.exceptions.ResponseError, TimeoutError) as exc:
            self._note_down(exc)
            return False, f"redis unreachable at {self.safe_url}: {self._redis_error}"
        if not self._live_workers:
            return False, f"no live worker (no heartbeat under '{self.names.prefix}:worker:*')"
        return True, "ok"

    async def submit(self, job: Job) -> JobResult:
        if self._closing or not self._started:
            raise BackendUnavailable(
                "the service is not accepting work (starting or shutting down)", retry_after_s=1
            )
        if job.expired():
            raise DeadlineExceeded("request deadline passed before the job was queued")
        if self.working_size is not None and job.pixels.nbytes != pixel_bytes(self.working_size):
            raise ValueError(
                f"job pixels {tuple(job.pixels.shape)} do not match working size {self.working_size}"
            )
        if self.require_worker and self._live_workers == 0 and self._down_since is None:
            raise BackendUnavailable("no model worker is running", retry_after_s=5)
        # The request id is the idempotency key: admitting it again (after a Redis stall, or when a
        # client retries with the same X-Request-ID) never queues the work twice.
        job_id = job.request_id or uuid.uuid4().hex
        if job_id in self._waiters:
            raise DuplicateRequest("a request with this X-Request-ID is already being processed")
        fields = encode_request(
            job,
            job_id=job_id,
            reply_to=self.reply_stream,
            reply_maxlen=self.reply_maxlen,
            reply_ttl_s=self.reply_ttl_s,
        )
        waiter = _Waiter(future=asyncio.get_running_loop().create_future())
        self._waiters[job_id] = waiter
        try:
            args: list[Any] = [self.max_queue, uuid.uuid4().hex, self.reply_ttl_s]
            for key, value in fields.items():
                args += [key, value]
            admitted, entry_id, epoch, backlog = await self._admit_until_known(job, job_id, args)
        except redis.exceptions.ResponseError as exc:
            self._waiters.pop(job_id, None)
            raise BackendUnavailable(f"queue backend refused the job: {exc}", retry_after_s=2) from None
        except BaseException:
            self._waiters.pop(job_id, None)
            raise
        if int(admitted) == 2:
            log.info(
                "admitted before the stall was noticed; waiting for its reply", extra={"request_id": job_id}
            )
        self._note_up()
        self._backlog = int(backlog)
        if not int(admitted):
            self._waiters.pop(job_id, None)
            raise QueueFull(
                f"inference queue is full ({self._backlog} of {self.max_queue} jobs)",
                retry_after_s=self.retry_after_s,
            )
        waiter.entry_id = _text(entry_id)
        waiter.epoch = _text(epoch)
        self.stats["submitted"] += 1
        try:
            reply = await asyncio.wait_for(
                asyncio.shield(waiter.future), timeout=max(0.0, job.deadline - time.time())
            )
        except TimeoutError:
            self._abandon_later(waiter.entry_id)
            raise DeadlineExceeded("request deadline passed while waiting for a model worker") from None
        except asyncio.CancelledError:
            self._abandon_later(waiter.entry_id)  # the caller went away: drop the entry if still waiting
            raise
        finally:
            self._waiters.pop(job_id, None)
        self._remember(job_id)
        if reply.error is not None:
            raise reply.error
        assert reply.result is not None
        return reply.result

    async def _admit_until_known(self, job: Job, job_id: str, args: list[Any]) -> tuple[Any, ...]:
        """Run the (idempotent) admit script until its outcome is known.

        A refused or reset connection means the job was not queued: 503 at once. A timeout (Redis
        stalled, the command possibly queued on the socket) leaves the outcome unknown, and a 503
        then would let a retrying client's image be processed twice; the admit is repeated instead
        (it cannot queue the job twice) until Redis answers, or the request's deadline passes (504:
        an expired job is never run by a worker).
        """
        keys = [self.names.requests, self.names.epoch, self.names.admitted(job_id)]
        delay = 0.05
        first = True
        while True:
            try:
                outcome = tuple(await self._admit(keys=keys, args=args))
                if int(outcome[0]) == 2 and first:
                    # Queued by an earlier request with this id (a client retry): never run it twice.
                    raise DuplicateRequest(
                        "a request with this X-Request-ID was already accepted; its answer went to that "
                        "request (send a new X-Request-ID to process the image again)"
                    )
                return outcome
            except (redis.exceptions.TimeoutError, TimeoutError) as exc:
                first = False
                self._note_down(exc)
                if job.expired() or time.time() + delay >= job.deadline:
                    raise DeadlineExceeded(
                        "request deadline passed while the queue backend did not answer"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            except TRANSIENT_ERRORS as exc:
                self._note_down(exc)
                raise BackendUnavailable(
                    f"queue backend unavailable: {self._redis_error}", retry_after_s=2
                ) from None

    def live_workers(self) -> int:
        """Workers with a live heartbeat, as last sampled (0 while unknown)."""
        return int(self._live_workers or 0)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add ``fundus_workers_alive`` (live heartbeats seen by this API process) to ``registry``."""
        alive = Gauge("fundus_workers_alive", "Model workers with a live Redis heartbeat", registry=registry)
        alive.set_function(lambda: float(self.live_workers()))

    # ------------------------------------------------------------------ background tasks

    async def _reader_loop(self) -> None:
        """Read this process's reply stream and resolve waiters; reconnects with backoff."""
        assert self._reader is not None and self._cmd is not None
        backoff = 0.05
        while not self._closing:
            try:
                response = await self._reader.xread(
                    {self.reply_stream: self._last_reply_id}, count=32, block=self.block_ms
                )
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except TRANSIENT_ERRORS as exc:
                self._note_down(exc)
                await asyncio.sleep(backoff)  # reconnect pacing
                backoff = min(backoff * 2, 1.0)
                continue
            entries = _entries(response)
            if not entries:
                continue
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                self._last_reply_id = _text(entry_id)
                self._deliver(fields or {})
            # Consumed replies are deleted at once (one reader per stream); MAXLEN/EXPIRE are the backstop.
            with contextlib.suppress(*TRANSIENT_ERRORS, redis.exceptions.ResponseError):
                await self._cmd.xdel(self.reply_stream, *ids)

    def _deliver(self, fields: dict[bytes, bytes]) -> None:
        try:
            reply = decode_reply(fields)
        except ProtocolError as exc:
            log.error("undecodable reply ignored", extra={"error": str(exc)})
            return
        waiter = self._waiters.get(reply.job_id)
        if waiter is None or waiter.future.done():
            # Answered already (an entry re-run after a reclaim), or nobody waits any more (timed out).
            key = (
                "duplicate_replies"
                if waiter is not None or reply.job_id in self._answered_set
                else "late_replies"
            )
            self.stats[key] += 1
            return
        waiter.future.set_result(reply)
        self.stats["answered"] += 1

    async def _monitor_loop(self) -> None:
        """Sample backlog, heartbeats and the epoch; fail in-flight jobs whose outcome is lost."""
        while not self._closing:
            try:
                await asyncio.wait_for(self._probe(), timeout=self.command_timeout_s + 1.0)
            except asyncio.CancelledError:
                raise
            except (*TRANSIENT_ERRORS, redis.exceptions.ResponseError, TimeoutError) as exc:
                self._note_down(exc)
            if self._down_since is not None and time.monotonic() - self._down_since >= self.outage_grace_s:
                self._fail_waiters(
                    lambda _w: True, f"lost the connection to the queue backend for {self.outage_grace_s:g} s"
                )
            await asyncio.sleep(self.monitor_interval_s)  # sampling period

    async def _probe(self) -> None:
        """One round of state sampling; raises when Redis is unreachable."""
        assert self._cmd is not None
        pipe = self._cmd.pipeline(transaction=False)
        pipe.set(self.names.epoch, uuid.uuid4().hex, nx=True, get=True)
        pipe.xlen(self.names.requests)
        pipe.xpending(self.names.requests, GROUP)
        pipe.zrange(self.names.workers, 0, 255)
        epoch_raw, length, pending, workers = await pipe.execute(raise_on_error=False)
        for value in (epoch_raw, length, workers):
            if isinstance(value, Exception):
                raise value
        if epoch_raw is None:  # our token was set: read it back
            epoch_raw = await self._cmd.get(self.names.epoch)
        epoch = _text(epoch_raw)
        if self._epoch is not None and epoch != self._epoch:
            lost = self._epoch
            log.warning(
                "redis lost its data (new epoch); failing jobs queued before", extra={"redis": self.safe_url}
            )
            self._fail_waiters(
                lambda w: w.epoch == lost, "the queue backend restarted and lost this request; retry"
            )
        self._epoch = epoch
        in_progress = 0 if isinstance(pending, Exception) or not pending else int(pending.get("pending") or 0)
        self._backlog = int(length)
        self._depth = max(0, self._backlog - in_progress)
        names = [_text(name) for name in workers]
        live = 0
        if names:
            beats = await self._cmd.mget([self.names.heartbeat(name) for name in names])
            gone = [name for name, beat in zip(names, beats, strict=True) if beat is None]
            live = len(names) - len(gone)
            if gone:
                await self._cmd.zrem(self.names.workers, *gone)
        self._live_workers = live
        self._note_up()

    # ------------------------------------------------------------------ helpers

    def _note_down(self, exc: BaseException) -> None:
        self._redis_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable", extra={"redis": self.safe_url, "error": self._redis_error})

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.info("redis reachable again", extra={"redis": self.safe_url})
        self._down_since = None
        self._redis_error = None

    def _fail_waiters(self, which: Any, message: str) -> None:
        for job_id, waiter in list(self._waiters.items()):
            if which(waiter) and not waiter.future.done():
                waiter.future.set_result(
                    Reply(job_id=job_id, error=BackendUnavailable(message, retry_after_s=2))
                )
                self.stats["lost"] += 1

    def _remember(self, job_id: str) -> None:
        if len(self._answered) == self._answered.maxlen:
            self._answered_set.discard(self._answered[0])
        self._answered.append(job_id)
        self._answered_set.add(job_id)

    def _abandon_later(self, entry_id: str) -> None:
        """Best effort: delete our entry if no worker has taken it, so it never reaches the model."""
        if not entry_id or self._abandon is None:
            return

        async def abandon() -> None:
            with contextlib.suppress(*TRANSIENT_ERRORS, redis.exceptions.ResponseError):
                await self._abandon(keys=[self.names.requests], args=[GROUP, entry_id])

        task = asyncio.get_running_loop().create_task(abandon())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
