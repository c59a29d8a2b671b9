"""Sending outbox items to the destination by C-STORE, with retries that survive restarts.

Each sender task (``FUNDUS_DIMSE_SEND_ASSOCIATIONS`` of them) takes the items that are due, oldest
first, opens one association for them (pynetdicom SCU, in a thread), sends every part not yet sent,
records each success in the item's ``state.json`` at once (a restart never sends a part twice unless
it crashed between the destination's answer and that write; the part then goes again with the same
SOP Instance UID, which a PACS stores once), and removes the item once every part is sent.

Two kinds of failure, two back-offs (both ``FUNDUS_DIMSE_RETRY_INITIAL_S`` doubling up to
``FUNDUS_DIMSE_RETRY_MAX_S``, ±20 % jitter so a fleet of nodes does not retry in step):

- the destination cannot be reached or refuses the association: no item is to blame; the whole
  destination waits, and only one probing association goes out when the wait is over. Items keep
  their attempt counts; they are retried forever.
- the association works but a C-STORE fails (a failure status, no answer, an abort): that item's
  attempts grow and it waits on its own, so one instance the PACS refuses never blocks the others.
  With ``FUNDUS_DIMSE_SEND_MAX_ATTEMPTS`` > 0 it is set aside in ``failed/`` after that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from service.dimse.config import Destination
from service.dimse.metrics import DimseMetrics
from service.dimse.spool import OutboxItem, Spool

log = logging.getLogger("fundus.dimse.forward")

#: Items (and so up to 3× as many instances) sent in one association.
BATCH_ITEMS = 16
#: pynetdicom allows 128 presentation contexts per association (odd ids 1..255).
MAX_CONTEXTS = 128
_WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


def backoff_s(failures: int, initial_s: float, max_s: float, jitter: float = 0.2) -> float:
    """Delay before the next try after ``failures`` consecutive failures (≥ 1): doubling, capped, jittered."""
    base = min(max_s, initial_s * 2.0 ** min(max(failures - 1, 0), 30))
    return base * random.uniform(1.0 - jitter, 1.0 + jitter)


def status_reason(status: int) -> str:
    """A bounded metric label for a C-STORE failure status (the exact value goes to the item's state)."""
    if 0xA700 <= status <= 0xA7FF:
        return "out_of_resources"
    if 0xA900 <= status <= 0xA9FF:
        return "dataset_mismatch"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot_understand"
    return "failure"


@dataclass
class _Tracked:
    item: OutboxItem
    due: float = 0.0  # time.monotonic() of the next try
    busy: bool = False


@dataclass
class BatchResult:
    """What one association did.

    Attributes:
        connected: the association was established (else ``reason`` says why not).
        reason: ``association_failed`` or ``association_rejected`` when not.
        delivered: items whose every part is now sent.
        failed: item id → failure code, for items that had a C-STORE fail.
        broken: the association ended early (abort, lost connection): untried items wait with the
            destination.
    """

    connected: bool
    reason: str = ""
    delivered: list[OutboxItem] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    broken: bool = False


class Forwarder:
    """Delivers outbox items to one destination (asyncio side; the DIMSE work runs in threads)."""

    def __init__(
        self,
        *,
        spool: Spool,
        destination: Destination,
        calling_ae_title: str,
        metrics: DimseMetrics,
        associations: int,
        retry_initial_s: float,
        retry_max_s: float,
        max_attempts: int,
        acse_timeout_s: float,
        dimse_timeout_s: float,
        network_timeout_s: float,
    ) -> None:
        self.spool = spool
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.metrics = metrics
        self.associations = associations
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.timeouts = (acse_timeout_s, dimse_timeout_s, network_timeout_s)
        self._items: dict[str, _Tracked] = {}
        self._wake = asyncio.Event()
        self._blocked_until = 0.0
        self._destination_failures = 0
        self._probing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=associations, thread_name_prefix="fundus-dimse-scu")
        self._open: set[Association] = set()
        self._open_lock = threading.Lock()
        self._stopping = False

    # -- control (event loop thread) ---------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sender(), name=f"fundus-dimse-sender-{index}")
            for index in range(self.associations)
        ]

    def add(self, item: OutboxItem) -> None:
        """Schedule an item for delivery now."""
        if item.item_id not in self._items:
            self._items[item.item_id] = _Tracked(item=item)
        self._wake.set()

    async def stop(self, timeout_s: float) -> None:
        """Stop sending: running associations get ``timeout_s`` to finish, then they are aborted.

        Whatever was not sent stays in the outbox for the next start.
        """
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        deadline = time.monotonic() + timeout_s
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the sender threads' associations
        with self._open_lock:
            for assoc in list(self._open):
                assoc.abort()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the sender loop ---------------------------------------------------------------------------------

    def _take_due(self) -> list[OutboxItem]:
        now = time.monotonic()
        if now < self._blocked_until or (self._destination_failures and self._probing):
            return []
        due = sorted(
            (tracked for tracked in self._items.values() if not tracked.busy and tracked.due <= now),
            key=lambda tracked: tracked.item.item_id,
        )[:BATCH_ITEMS]
        for tracked in due:
            tracked.busy = True
        if due and self._destination_failures:
            self._probing = True  # only one association tries a destination that was down
        return [tracked.item for tracked in due]

    def _next_wake_in(self) -> float | None:
        now = time.monotonic()
        waiting = [tracked.due for tracked in self._items.values() if not tracked.busy]
        if not waiting:
            return None
        return max(0.0, max(min(waiting), self._blocked_until) - now)

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take_due()
            if not batch:
                self._wake.clear()
                batch = self._take_due()
            if not batch:
                timeout = self._next_wake_in()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                continue
            try:
                result = await loop.run_in_executor(self._executor, self._send_batch, batch)
            except Exception as exc:  # a bug, not a peer problem: retry the items later, keep going
                log.exception("sending failed unexpectedly", extra={"reason": type(exc).__name__})
                result = BatchResult(connected=False, reason="internal_error")
            self._apply(batch, result)

    def _apply(self, batch: list[OutboxItem], result: BatchResult) -> None:
        self._probing = False
        now = time.monotonic()
        if not result.connected:
            self._destination_failures += 1
            delay = backoff_s(self._destination_failures, self.retry_initial_s, self.retry_max_s)
            self._blocked_until = now + delay
            self.metrics.destination_up.set(0)
            self.metrics.failed.labels(stage="send", reason=result.reason).inc()
            log.warning(
                "destination unavailable; retrying later",
                extra={
                    "destination": str(self.destination),
                    "reason": result.reason,
                    "retry_in_s": round(delay, 2),
                    "waiting_items": len(self._items),
                },
            )
        else:
            self._destination_failures = 0
            self._blocked_until = 0.0
            self.metrics.destination_up.set(1)
            if result.broken:
                # The connection went away mid-way: try the rest soon, through a fresh association.
                self._blocked_until = now + backoff_s(1, self.retry_initial_s, self.retry_max_s)
        for item in result.delivered:
            self._items.pop(item.item_id, None)
        for item in batch:
            tracked = self._items.get(item.item_id)
            if tracked is None:
                continue
            tracked.busy = False
            code = result.failed.get(item.item_id)
            if code is None:
                continue
            tracked.due = now + backoff_s(item.attempts, self.retry_initial_s, self.retry_max_s)
            if code == "unreadable_part" or (self.max_attempts and item.attempts >= self.max_attempts):
                self._items.pop(item.item_id, None)
                self._set_aside(item)
        self._wake.set()

    def _set_aside(self, item: OutboxItem) -> None:
        try:
            self.spool.set_aside(item)
        except OSError as exc:
            log.error("could not set an item aside", extra={"item": item.item_id, "errno": exc.errno})
            return
        self.metrics.failed.labels(stage="set_aside", reason=item.last_error.split(" ", 1)[0]).inc()
        log.error(
            "item set aside in failed/ after repeated send failures",
            extra={"item": item.item_id, "attempts": item.attempts, "reason": item.last_error},
        )

    # -- one association (sender thread) -----------------------------------------------------------------

    def _send_batch(self, batch: list[OutboxItem]) -> BatchResult:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self.timeouts
        ae.connection_timeout = self.timeouts[0]
        contexts: list[tuple[str, tuple[str, ...]]] = []
        for item in batch:
            for part in item.unsent:
                # A compressed instance needs a context of its own syntax (an SCP accepts one syntax per
                # context, and compressed data is sent as it is); uncompressed ones may go either way.
                syntaxes = (
                    _UNCOMPRESSED
                    if part.transfer_syntax_uid in _UNCOMPRESSED
                    else (part.transfer_syntax_uid,)
                )
                if (part.sop_class_uid, syntaxes) not in contexts:
                    contexts.append((part.sop_class_uid, syntaxes))
        for sop_class, syntaxes in contexts[:MAX_CONTEXTS]:
            ae.add_requested_context(UID(sop_class), [UID(syntax) for syntax in syntaxes])
        if self._stopping:
            return BatchResult(connected=False, reason="stopping")
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            # Rejected: the destination answered A-ASSOCIATE-RJ (e.g. our AE title is not configured
            # there). Failed: no connection, a timeout, or an abort during set-up (pynetdicom reports a
            # refused connection as an abort too).
            reason = "association_rejected" if assoc.is_rejected else "association_failed"
            return BatchResult(connected=False, reason=reason)
        with self._open_lock:
            self._open.add(assoc)
        result = BatchResult(connected=True)
        try:
            for item in batch:
                if not assoc.is_established or self._stopping:
                    result.broken = True
                    break
                code = self._send_item(assoc, item)
                if code is None:
                    result.delivered.append(item)
                else:
                    result.failed[item.item_id] = code
        finally:
            with self._open_lock:
                self._open.discard(assoc)
            if assoc.is_established:
                assoc.release()
        return result

    def _send_item(self, assoc: Association, item: OutboxItem) -> str | None:
        """Send the item's unsent parts; None when all are sent now, else the failure code."""
        for part in item.unsent:
            code, detail = self._store(assoc, item, part.file)
            if code is not None:
                item.attempts += 1
                item.last_error = f"{code} {detail}".strip()
                self.metrics.failed.labels(stage="send", reason=code).inc()
                log.warning(
                    "C-STORE to the destination failed",
                    extra={
                        "item": item.item_id,
                        "part": part.kind,
                        "reason": item.last_error,
                        "attempts": item.attempts,
                    },
                )
                self._save(item)
                return code
            part.sent = True
            self.metrics.forwarded.labels(kind=part.kind).inc()
            if item.unsent:
                self._save(item)
        latency = max(0.0, time.time() - item.received_at)
        self.metrics.forward_latency.observe(latency)
        try:
            self.spool.finish(item)
        except OSError as exc:  # it stays in the outbox: sent again after a restart, stored once
            log.error("could not remove a delivered item", extra={"item": item.item_id, "errno": exc.errno})
        log.info(
            "item delivered",
            extra={"item": item.item_id, "parts": len(item.parts), "latency_s": round(latency, 3)},
        )
        return None

    def _save(self, item: OutboxItem) -> None:
        try:
            self.spool.save(item)
        except OSError as exc:  # the part may be sent again after a restart; the PACS stores it once
            log.error("could not record a send", extra={"item": item.item_id, "errno": exc.errno})

    @staticmethod
    def _store(assoc: Association, item: OutboxItem, file: str) -> tuple[str | None, str]:
        path = item.directory / file
        if not path.is_file():
            return "unreadable_part", "missing file"
        try:
            status = assoc.send_c_store(path)
        except ValueError:
            return "no_presentation_context", "the destination accepted no context for this instance"
        except (OSError, AttributeError, EOFError) as exc:
            return "unreadable_part", type(exc).__name__
        except Exception as exc:  # pydicom cannot read or re-encode the file
            return "unreadable_part", type(exc).__name__
        if "Status" not in status:
            return ("association_aborted" if not assoc.is_established else "no_response"), ""
        value = int(status.Status)
        if value == 0x0000 or value in _WARNING_STATUSES:
            return None, ""
        return status_reason(value), f"0x{value:04X}"
