"""The Redis Streams model worker behind ``fundus worker``.

One worker = one process = one device. The loop, in one thread:

1. on start, re-read this consumer's own pending entries (id ``0``), then switch to new ones (``>``);
2. ``XREADGROUP COUNT=max_batch BLOCK<=1s``, then top the batch up until ``max_batch_wait_ms`` after
   the first entry arrived;
3. drop what must not run: undecodable entries and entries delivered more than ``max_deliveries``
   times go to the dead-letter stream with an error reply; expired entries get a deadline reply;
4. run the rest through the model (grouped by shape; a failing batch is retried job by job so one
   poison image fails alone);
5. in one MULTI/EXEC: XADD every reply to its API process's reply stream (``MAXLEN ~`` + EXPIRE),
   XADD dead letters, XACK and XDEL the entries. Nothing is acked before its reply is written.

Between batches a janitor XAUTOCLAIMs entries idle longer than ``claim_idle_ms`` (their worker
died) following the cursor, and processes them like any other batch. A heartbeat thread keeps a
``<prefix>:worker:<name>`` key alive (the API's readiness), re-claims the entries of the batch in
flight with ``JUSTID`` so a slow batch is never stolen from a live worker, and samples stream gauges.

``stop()`` (SIGTERM/SIGINT through :meth:`Worker.install_signal_handlers`) lets the current batch
finish and reply, stops reading and returns from :meth:`Worker.run`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.queue.base import DeadlineExceeded, InferenceFailed, Job, JobResult, QueueError
from service.queue.redis_protocol import (
    DEAD_LETTER_MAXLEN,
    DEFAULT_BLOCK_MS,
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_HEARTBEAT_TTL_S,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_PREFIX,
    GROUP,
    ProtocolError,
    RequestEntry,
    StreamNames,
    decode_request,
    encode_dead_letter,
    encode_error,
    encode_result,
    heartbeat_value,
    peek_reply_target,
)
from service.settings import Settings
from service.worker_metrics import WorkerMetrics

log = logging.getLogger("fundus.worker")

BatchFunction = Callable[[Sequence[Job]], list[JobResult]]

# Errors after which a retry may succeed (Redis restarting, network blip, failover to a replica).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

CONSUMER_PRUNE_IDLE_MS = 10 * 60 * 1000  # forget consumers with nothing pending after 10 idle minutes
CONSUMER_PRUNE_INTERVAL_S = 60.0


class WorkerSettings(Settings):
    """``Settings`` plus the worker-only knobs (same ``FUNDUS_`` prefix)."""

    worker_name: str | None = Field(default=None, description="consumer name; default host-pid-random")
    worker_metrics_port: int = Field(
        default=-1,
        ge=-1,
        le=65535,
        description="worker /metrics port; -1 = 9101 + the GPU index (next free one if taken), 0 = off",
    )
    worker_metrics_host: str = Field(default="0.0.0.0", description="bind address of the worker /metrics")
    redis_stream_prefix: str = Field(default=DEFAULT_PREFIX, description="prefix of every Redis key")
    redis_claim_idle_s: float = Field(
        default=DEFAULT_CLAIM_IDLE_MS / 1000,
        gt=0.0,
        description="reclaim entries idle this long (dead worker)",
    )
    redis_max_deliveries: int = Field(
        default=DEFAULT_MAX_DELIVERIES, ge=1, description="deliveries before an entry is dead-lettered"
    )
    worker_heartbeat_ttl_s: float = Field(
        default=DEFAULT_HEARTBEAT_TTL_S, gt=0.0, description="heartbeat key TTL; refreshed every TTL/3"
    )


@dataclass
class _Outcome:
    """What one processed batch writes back in its closing transaction."""

    replies: list[tuple[str, dict[str, Any], int, int]] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    latest_deadline: float = 0.0

    def reply(self, entry: RequestEntry, fields: dict[str, Any]) -> None:
        self.replies.append((entry.reply_to, fields, entry.reply_maxlen, entry.reply_ttl_s))
        self.latest_deadline = max(self.latest_deadline, entry.job.deadline)


def _id_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def connect(url: str, *, socket_timeout: float) -> redis.Redis:
    """A binary-safe client (pixels are raw bytes) with one quick retry for a stale pooled connection."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(3.0, socket_timeout),
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        decode_responses=False,
        health_check_interval=0,
    )


class Worker:
    """Consumes the request stream in batches and answers through each API process's reply stream.

    Args:
        url: Redis URL (``redis://`` or ``rediss://``, password in the URL).
        run_batch: runs jobs of one shape through the model, one result per job in order
            (``ModelRunner.run_jobs``); may raise, which fails the offending jobs only.
        name: consumer name in the group (unique per live worker).
        stream_prefix: key prefix shared with the API processes.
        max_batch_size: entries per model pass at most.
        max_batch_wait_ms: longest the batch waits to fill after its first entry arrived.
        block_ms: XREADGROUP BLOCK (kept at most 1 s so the socket timeout never fires).
        claim_idle_ms: entries idle this long are presumed orphaned and reclaimed.
        max_deliveries: an entry delivered more often than this is dead-lettered.
        heartbeat_ttl_s: TTL of the heartbeat key (refreshed every third of it).
        janitor_interval_s: how often to look for orphaned entries (default: a quarter of claim_idle).
        device / model_version: published in the heartbeat for operators.
        metrics: collectors to update (a private set by default).
    """

    def __init__(
        self,
        url: str,
        run_batch: BatchFunction,
        *,
        name: str | None = None,
        stream_prefix: str = DEFAULT_PREFIX,
        max_batch_size: int = 8,
        max_batch_wait_ms: float = 10.0,
        block_ms: int = DEFAULT_BLOCK_MS,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
        janitor_interval_s: float | None = None,
        device: str = "cpu",
        model_version: str = "",
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_deliveries < 1 or claim_idle_ms < 1 or heartbeat_ttl_s <= 0:
            raise ValueError(
                "max_batch_size, max_deliveries, claim_idle_ms and heartbeat_ttl_s must be positive"
            )
        self.url = url
        self.run_batch = run_batch
        self.name = name or default_worker_name()
        self.names = StreamNames(stream_prefix)
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max(0.0, max_batch_wait_ms / 1000.0)
        self.block_ms = max(1, min(int(block_ms), 1000))
        self.claim_idle_ms = int(claim_idle_ms)
        self.max_deliveries = max_deliveries
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.janitor_interval_s = (
            janitor_interval_s if janitor_interval_s is not None else claim_idle_ms / 4000
        )
        self.device = device
        self.model_version = model_version
        self.metrics = metrics or WorkerMetrics()
        self.started_at = time.time()
        self.batches_run = 0

        self._stop = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._running = threading.Event()
        self._client: redis.Redis | None = None
        self._group_ready = False
        self._own_pel_cursor: str | None = "0-0"  # None once the own backlog is drained
        self._claim_cursor = "0-0"
        self._next_janitor = 0.0
        self._next_consumer_prune = 0.0
        self._in_flight: tuple[tuple[str, ...], float] = ((), 0.0)  # (entry ids, latest deadline)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to finish the current batch and return (safe from signal handlers and threads)."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._running.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT → :meth:`stop` (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: self.stop())

    def run(self) -> None:
        """Serve until :meth:`stop`; Redis outages are waited out with backoff, never fatal."""
        self._client = connect(self.url, socket_timeout=self.block_ms / 1000 + 5.0)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.name}", daemon=True)
        heartbeat.start()
        self._running.set()
        log.info(
            "worker started", extra={"worker": self.name, "device": self.device, "model": self.model_version}
        )
        backoff = 0.1
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    backoff = 0.1
                except TRANSIENT_ERRORS as exc:
                    self.metrics.redis_errors.inc()
                    self.metrics.up.set(0)
                    log.warning("redis unavailable; retrying", extra={"worker": self.name, "error": str(exc)})
                    # Entries read before the error sit in this consumer's PEL: take them up first.
                    self._own_pel_cursor = "0-0"
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                except redis.exceptions.RedisError as exc:
                    # e.g. OOM refusals or a failover in progress: keep serving once Redis accepts commands.
                    self.metrics.redis_errors.inc()
                    log.error(
                        "redis refused a command; retrying", extra={"worker": self.name, "error": str(exc)}
                    )
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            self._heartbeat_stop.set()
            heartbeat.join(timeout=5.0)
            self._withdraw_heartbeat()
            self._client.close()
            self._running.clear()
            log.info("worker stopped", extra={"worker": self.name, "batches": self.batches_run})

    # ------------------------------------------------------------------ one loop iteration

    def _step(self) -> None:
        client = self._redis()
        if not self._group_ready:
            self._ensure_group(client)
        try:
            if time.monotonic() >= self._next_janitor:
                claimed = self._janitor(client)
                if claimed:
                    self._process(claimed, self._delivery_counts(client, claimed))
                    return
            if self._own_pel_cursor is not None:
                entries = self._read(client, self._own_pel_cursor, self.max_batch_size, block_ms=None)
                if not entries:
                    self._own_pel_cursor = None
                    return
                self._own_pel_cursor = _id_text(entries[-1][0])
                self._process(entries, self._delivery_counts(client, entries))
                return
            entries = self._read(client, ">", self.max_batch_size, block_ms=self.block_ms)
            if entries:
                self._process(self._top_up(client, entries), None)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the group (restart without persistence, flush): recreate it and go on.
            log.warning("consumer group missing; recreating it", extra={"worker": self.name})
            self._group_ready = False
            self._own_pel_cursor = None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("worker is not running")
        return self._client

    def _ensure_group(self, client: redis.Redis) -> None:
        """Create the group at id 0 so entries added before any worker existed are still served."""
        try:
            client.xgroup_create(self.names.requests, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _read(self, client: redis.Redis, start: str, count: int, *, block_ms: int | None) -> list[Any]:
        response = client.xreadgroup(
            GROUP, self.name, {self.names.requests: start}, count=count, block=block_ms
        )
        if not response:
            return []
        if isinstance(response, dict):  # RESP3
            return [entry for entries in response.values() for entry in entries[0]]
        return list(response[0][1])

    def _top_up(self, client: redis.Redis, entries: list[Any]) -> list[Any]:
        """Read more new entries until the batch is full or ``max_batch_wait`` has passed since the first.

        Polls with non-blocking reads: Redis resolves BLOCK timeouts only every 1/hz s (100 ms by
        default), far coarser than a few milliseconds of batching wait.
        """
        closes = time.monotonic() + self.max_batch_wait_s
        pause = min(0.02, max(0.0005, self.max_batch_wait_s / 10))
        while len(entries) < self.max_batch_size and not self._stop.is_set():
            entries.extend(self._read(client, ">", self.max_batch_size - len(entries), block_ms=None))
            remaining = closes - time.monotonic()
            if len(entries) >= self.max_batch_size or remaining <= 0:
                break
            time.sleep(min(pause, remaining))  # polling period of the batching window
        return entries

    # ------------------------------------------------------------------ recovery

    def _janitor(self, client: redis.Redis) -> list[Any]:
        """Claim up to one batch of entries idle past ``claim_idle_ms``, following the XAUTOCLAIM cursor."""
        now = time.monotonic()
        if now >= self._next_consumer_prune:
            self._next_consumer_prune = now + CONSUMER_PRUNE_INTERVAL_S
            self._prune_consumers(client)
        claimed: list[Any] = []
        start = self._claim_cursor
        for _ in range(10):
            response = client.xautoclaim(
                self.names.requests,
                GROUP,
                self.name,
                self.claim_idle_ms,
                start_id=start,
                count=self.max_batch_size - len(claimed),
            )
            start = _id_text(response[0])
            claimed.extend(entry for entry in response[1] if entry[0] is not None)
            if start == "0-0" or len(claimed) >= self.max_batch_size:
                break
        self._claim_cursor = start
        # A full claim may leave more behind: look again right away instead of after the interval.
        full = len(claimed) >= self.max_batch_size
        self._next_janitor = now if full else now + self.janitor_interval_s
        if claimed:
            self.metrics.reclaimed.inc(len(claimed))
            log.warning("reclaimed orphaned entries", extra={"worker": self.name, "count": len(claimed)})
        return claimed

    def _delivery_counts(self, client: redis.Redis, entries: list[Any]) -> dict[str, int]:
        """Delivery count per entry id (this consumer's PEL) from XPENDING."""
        ids = [_id_text(entry[0]) for entry in entries]
        rows = client.xpending_range(
            self.names.requests,
            GROUP,
            min=min(ids, key=_id_key),
            max=max(ids, key=_id_key),
            count=max(100, 4 * len(ids)),
            consumername=self.name,
        )
        return {_id_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def _prune_consumers(self, client: redis.Redis) -> None:
        """Forget long-idle consumers with nothing pending (dead workers' names pile up otherwise)."""
        for consumer in client.xinfo_consumers(self.names.requests, GROUP):
            name = _id_text(consumer["name"])
            if (
                name != self.name
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > CONSUMER_PRUNE_IDLE_MS
            ):
                client.xgroup_delconsumer(self.names.requests, GROUP, name)

    # ------------------------------------------------------------------ a batch

    def _process(self, entries: list[Any], deliveries: dict[str, int] | None) -> None:
        """Triage ``entries``, run the runnable ones, then reply + ack in one transaction."""
        outcome = _Outcome()
        runnable: list[tuple[str, RequestEntry]] = []
        now = time.time()
        for raw_id, fields in entries:
            entry_id = _id_text(raw_id)
            count = deliveries.get(entry_id, 1) if deliveries is not None else 1
            try:
                entry = decode_request(fields or {})
            except ProtocolError as exc:
                self._reject_malformed(outcome, entry_id, fields or {}, str(exc), count)
                continue
            outcome.acks.append(entry_id)
            if count > self.max_deliveries:
                self._dead_letter(outcome, entry_id, fields, entry, f"delivered {count} times", count)
                continue
            if entry.job.expired(now):
                self.metrics.jobs.labels(outcome="expired").inc()
                outcome.reply(
                    entry,
                    encode_error(entry.job_id, DeadlineExceeded("deadline passed before the model ran")),
                )
                continue
            runnable.append((entry_id, entry))
        if runnable:
            self._in_flight = (
                tuple(entry_id for entry_id, _ in runnable),
                max(entry.job.deadline for _, entry in runnable),
            )
            self.metrics.busy.set(1)
            try:
                self._run(runnable, outcome, {entry_id: fields for entry_id, fields in self._raw(entries)})
            finally:
                self.metrics.busy.set(0)
                self.batches_run += 1
        try:
            self._finish(outcome)
        finally:
            self._in_flight = ((), 0.0)

    @staticmethod
    def _raw(entries: list[Any]) -> list[tuple[str, Any]]:
        return [(_id_text(raw_id), fields or {}) for raw_id, fields in entries]

    def _run(self, runnable: list[tuple[str, RequestEntry]], outcome: _Outcome, raw: dict[str, Any]) -> None:
        """Run ``runnable`` grouped by shape; a failing group is retried job by job to isolate poison."""
        groups: dict[tuple[int, ...], list[tuple[str, RequestEntry]]] = {}
        for item in runnable:
            groups.setdefault(tuple(item[1].job.pixels.shape), []).append(item)
        for group in groups.values():
            self._run_group(group, outcome, raw)

    def _run_group(
        self, group: list[tuple[str, RequestEntry]], outcome: _Outcome, raw: dict[str, Any]
    ) -> None:
        started = time.time()
        clock = time.perf_counter()
        jobs = [entry.job for _, entry in group]
        try:
            results = self.run_batch(jobs)
            if len(results) != len(jobs):
                raise RuntimeError(f"runner returned {len(results)} results for {len(jobs)} jobs")
        except Exception as exc:
            if len(group) > 1:
                log.warning(
                    "batch failed; retrying its jobs one by one",
                    extra={"worker": self.name, "batch_size": len(group), "error": type(exc).__name__},
                )
                for item in group:
                    self._run_group([item], outcome, raw)
                return
            entry_id, entry = group[0]
            log.error(
                "job failed alone; dead-lettering it",
                extra={"worker": self.name, "request_id": entry.job.request_id, "error": type(exc).__name__},
            )
            self._dead_letter(
                outcome,
                entry_id,
                raw.get(entry_id, {}),
                entry,
                f"model pass failed: {type(exc).__name__}",
                0,
                message=f"the model failed on this image ({type(exc).__name__}); dead-lettered",
            )
            return
        seconds = time.perf_counter() - clock
        self.metrics.observe_batch(len(jobs), seconds, [started - job.enqueued_at for job in jobs])
        self.metrics.jobs.labels(outcome="ok").inc(len(jobs))
        for (_, entry), result in zip(group, results, strict=True):
            outcome.reply(entry, encode_result(entry.job_id, result))

    def _dead_letter(
        self,
        outcome: _Outcome,
        entry_id: str,
        fields: Any,
        entry: RequestEntry,
        reason: str,
        deliveries: int,
        *,
        message: str | None = None,
    ) -> None:
        self.metrics.dead_lettered.inc()
        self.metrics.jobs.labels(outcome="dead_letter").inc()
        log.error(
            "entry dead-lettered",
            extra={"worker": self.name, "request_id": entry.job.request_id, "reason": reason},
        )
        outcome.dead_letters.append(
            encode_dead_letter(
                entry_id, fields, reason=reason, deliveries=deliveries, worker=self.name, at=time.time()
            )
        )
        text = message or (
            f"processing was attempted {deliveries - 1} times without an answer (worker crash); "
            "the request was moved to the dead-letter queue"
        )
        outcome.reply(entry, encode_error(entry.job_id, InferenceFailed(text)))

    def _reject_malformed(self, outcome: _Outcome, entry_id: str, fields: Any, why: str, count: int) -> None:
        self.metrics.jobs.labels(outcome="malformed").inc()
        self.metrics.dead_lettered.inc()
        log.error(
            "malformed entry dead-lettered", extra={"worker": self.name, "entry": entry_id, "reason": why}
        )
        outcome.acks.append(entry_id)
        outcome.dead_letters.append(
            encode_dead_letter(
                entry_id,
                fields,
                reason=f"malformed: {why}",
                deliveries=count,
                worker=self.name,
                at=time.time(),
            )
        )
        target = peek_reply_target(fields)
        if target is not None:
            job_id, reply_to = target
            error: QueueError = InferenceFailed("the queued request was malformed and could not be processed")
            outcome.replies.append((reply_to, encode_error(job_id, error), 1000, 300))

    def _finish(self, outcome: _Outcome) -> None:
        """Write replies and dead letters, then XACK + XDEL, atomically; retried through short outages."""
        if not (outcome.replies or outcome.dead_letters or outcome.acks):
            return
        give_up = max(outcome.latest_deadline, time.time() + 5.0)
        backoff = 0.05
        client = self._redis()
        while True:
            try:
                pipe = client.pipeline(transaction=True)
                for stream, fields, maxlen, ttl in outcome.replies:
                    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
                    pipe.expire(stream, ttl)
                for fields in outcome.dead_letters:
                    pipe.xadd(self.names.dead_letters, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
                if outcome.acks:
                    pipe.xack(self.names.requests, GROUP, *outcome.acks)
                    pipe.xdel(self.names.requests, *outcome.acks)
                pipe.execute()
                return
            except redis.exceptions.ResponseError as exc:
                # Replies went through; the group vanished with a Redis restart: nothing left to ack.
                log.warning("acknowledging failed", extra={"worker": self.name, "error": str(exc)})
                self._group_ready = False
                return
            except TRANSIENT_ERRORS as exc:
                self.metrics.redis_errors.inc()
                if time.time() > give_up:
                    log.error(
                        "could not write replies before their deadlines; leaving the entries pending",
                        extra={"worker": self.name, "error": str(exc), "count": len(outcome.acks)},
                    )
                    return
                time.sleep(backoff)  # retry pacing, not synchronisation
                backoff = min(backoff * 2, 1.0)

    # ------------------------------------------------------------------ heartbeat thread

    def _heartbeat_loop(self) -> None:
        client = connect(self.url, socket_timeout=5.0)
        interval = max(0.05, self.heartbeat_ttl_s / 3)
        value = heartbeat_value(
            worker=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.device,
            model_version=self.model_version,
            started=self.started_at,
        )
        try:
            while True:
                try:
                    self._beat(client, value)
                    self.metrics.up.set(1)
                except (*TRANSIENT_ERRORS, redis.exceptions.ResponseError) as exc:
                    self.metrics.redis_errors.inc()
                    self.metrics.up.set(0)
                    log.debug("heartbeat failed", extra={"worker": self.name, "error": str(exc)})
                if self._heartbeat_stop.wait(interval):
                    return
        finally:
            client.close()

    def _beat(self, client: redis.Redis, value: str) -> None:
        ids, latest_deadline = self._in_flight
        pipe = client.pipeline(transaction=False)
        pipe.set(self.names.heartbeat(self.name), value, px=max(1, int(self.heartbeat_ttl_s * 1000)))
        pipe.zadd(self.names.workers, {self.name: time.time()})
        pipe.xlen(self.names.requests)
        pipe.time()
        _, _, length, server_time = pipe.execute()
        self.metrics.stream_length.set(int(length))
        if ids and time.time() < latest_deadline:
            # Reset the idle time of the batch in flight so no other worker reclaims it while we run it.
            client.xclaim(self.names.requests, GROUP, self.name, 0, list(ids), justid=True)
        try:
            summary = client.xpending(self.names.requests, GROUP)
        except redis.exceptions.ResponseError:
            summary = {"pending": 0, "min": None}
        self.metrics.pending.set(int(summary["pending"] or 0))
        oldest = summary.get("min")
        if oldest:
            now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
            self.metrics.oldest_pending_age.set(max(0.0, (now_ms - _id_key(_id_text(oldest))[0]) / 1000))
        else:
            self.metrics.oldest_pending_age.set(0.0)

    def _withdraw_heartbeat(self) -> None:
        """Remove this worker's heartbeat on a clean stop so the API stops counting it at once."""
        try:
            client = connect(self.url, socket_timeout=2.0)
            try:
                client.delete(self.names.heartbeat(self.name))
                client.zrem(self.names.workers, self.name)
            finally:
                client.close()
        except TRANSIENT_ERRORS:
            pass


def _id_key(entry_id: str) -> tuple[int, int]:
    """Sortable form of a stream id ``<ms>-<seq>``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def worker_from_settings(
    settings: WorkerSettings,
    run_batch: BatchFunction,
    *,
    device: str,
    model_version: str,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A :class:`Worker` configured from ``FUNDUS_*`` settings."""
    if not settings.redis_url:
        raise ValueError("FUNDUS_REDIS_URL is required for a worker")
    return Worker(
        settings.redis_connection_url or settings.redis_url,
        run_batch,
        name=settings.worker_name,
        stream_prefix=settings.redis_stream_prefix,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_ms=settings.max_batch_wait_ms,
        claim_idle_ms=math.ceil(settings.redis_claim_idle_s * 1000),
        max_deliveries=settings.redis_max_deliveries,
        heartbeat_ttl_s=settings.worker_heartbeat_ttl_s,
        device=device,
        model_version=model_version,
        metrics=metrics,
    )
