"""``fundus dicom-node``: Storage SCP → durable spool → the service's queue → C-STORE to the PACS.

Threads and the loop:

- pynetdicom's server thread and one thread per association run :class:`StorageSCP`; a C-STORE
  writes the data set to ``incoming/`` and hands the item id to the event loop.
- one asyncio event loop (its own thread) runs ``FUNDUS_DIMSE_CONCURRENCY`` processing tasks and the
  :class:`Forwarder`'s sender tasks. Processing is the HTTP path's work (:mod:`service.dimse.pipeline`):
  decode and crop in the CPU pool, one queue job per output (the embedded micro-batcher or Redis,
  built by :func:`service.queue.factory.build_queue` exactly as ``fundus serve`` builds it), encode in
  the CPU pool, then one durable commit of the derived instances to ``outbox/``.
- ``http.server`` serves ``/metrics``, ``/healthz`` and ``/readyz``.

Faults:

- client data that the HTTP API would refuse (415, 422, 413: corrupt, not a photograph, multi-frame,
  not a fundus, too large) → ``quarantine/`` with a reason file; the node goes on.
- the queue is full, unreachable or late → the item stays in ``incoming/`` and is retried with back-off;
  a model pass that keeps failing for the same instance (3 times) quarantines it.
- a crash at any point loses nothing acknowledged: at start every ``incoming/`` item is processed and
  every ``outbox/`` item is sent (see :mod:`service.dimse.spool` and :mod:`service.dimse.forwarder`).

Logs name items by their random spool id and instances by a hash of the SOP Instance UID; metrics
carry no identifiers at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import io
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydicom

from model.quality import load_quality
from service.codecs import CodecError, default_registry
from service.dimse.config import (
    Destination,
    Network,
    check_ae_title,
    parse_ae_titles,
    parse_destination,
    parse_networks,
)
from service.dimse.forwarder import Forwarder, backoff_s
from service.dimse.http import ProbeServer
from service.dimse.metrics import DimseMetrics
from service.dimse.pipeline import (
    ImageContext,
    encode_enhanced,
    encode_segmentation,
    model_job,
    prepare_instance,
    trust_report,
)
from service.dimse.scp import StorageSCP
from service.dimse.spool import NewPart, Spool
from service.errors import ApiError
from service.imaging import Prepared
from service.queue.base import InferenceFailed, InferenceQueue, JobResult, QueueError, Task
from service.queue.embedded import EmbeddedQueue
from service.queue.factory import build_queue
from service.runner import ModelRunner, load_runner
from service.settings import Settings

log = logging.getLogger("fundus.dimse")

T = TypeVar("T")

#: Model passes that may fail for one instance before it is quarantined as ``inference_failed``.
MAX_INFERENCE_FAILURES = 3


@dataclass(frozen=True)
class NodeConfig:
    """The node's parsed, validated settings (a bad value fails here, before anything starts)."""

    ae_title: str
    destination: Destination
    allowed_ae_titles: list[str]
    allowed_networks: list[Network]

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeConfig:
        """Raises :class:`service.dimse.config.DimseConfigError` naming the bad setting."""
        return cls(
            ae_title=check_ae_title(settings.dimse_ae_title, "FUNDUS_DIMSE_AE_TITLE"),
            destination=parse_destination(settings.dimse_destination),
            allowed_ae_titles=parse_ae_titles(settings.dimse_allowed_ae_titles),
            allowed_networks=parse_networks(settings.dimse_allowed_hosts),
        )


class DicomNode:
    """The whole node; :meth:`start` and :meth:`stop` from any one thread, or :meth:`serve_forever`.

    Args:
        settings: ``FUNDUS_*`` settings (the ``dimse_*`` ones and the model, queue and limit ones).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = NodeConfig.from_settings(settings)
        self.spool = Spool(settings.dimse_spool_dir)
        self.metrics = DimseMetrics()
        self.codecs = default_registry()
        self.image: ImageContext | None = None
        self.runner: ModelRunner | None = None
        self.queue: InferenceQueue | None = None
        self.scp: StorageSCP | None = None
        self.forwarder: Forwarder | None = None
        self.http: ProbeServer | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=settings.cpu_threads, thread_name_prefix="fundus-dimse-cpu"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._work: asyncio.Queue[str] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._known: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._inference_failures: dict[str, int] = {}
        self._active = 0
        self._draining = False
        self._ready = False
        self._stopped = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def dimse_port(self) -> int:
        assert self.scp is not None
        return self.scp.bound_port

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def start(self) -> None:
        """Open the spool, load the model (or its metadata with Redis), start the loop, the probes and,
        last, the SCP. Returns once the node accepts associations; on any error, what was started is
        stopped again and the error raised."""
        try:
            self._start()
        except BaseException:
            self.stop(timeout_s=0.0)
            raise

    def _start(self) -> None:
        settings = self.settings
        # pynetdicom logs every refused connection and peer abort at ERROR; the node logs each outcome
        # itself (with its retry plan), so the library's own lines would only repeat them.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self.spool.open()
        self.metrics.track_spool(self.spool.depth)
        if settings.dimse_metrics_port:
            self.http = ProbeServer(
                settings.dimse_host, settings.dimse_metrics_port, self.metrics.registry, self.readiness
            )
            self.http.start()
        self.image = self._load_model()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="fundus-dimse-loop", daemon=True
        )
        self._loop_thread.start()
        self._call(self._start_async())
        self.scp = StorageSCP(
            ae_title=self.config.ae_title,
            host=settings.dimse_host,
            port=settings.dimse_port,
            spool=self.spool,
            metrics=self.metrics,
            allowed_ae_titles=self.config.allowed_ae_titles,
            allowed_networks=self.config.allowed_networks,
            on_received=self._received,
            max_associations=settings.dimse_max_associations,
            acse_timeout_s=settings.dimse_acse_timeout_s,
            dimse_timeout_s=settings.dimse_dimse_timeout_s,
            network_timeout_s=settings.dimse_network_timeout_s,
            max_instance_bytes=settings.max_upload_bytes,
        )
        self.scp.start()
        self._ready = True
        self.metrics.base.ready.set(1)
        log.info(
            "dicom node ready",
            extra={
                "ae_title": self.config.ae_title,
                "dimse_port": self.dimse_port,
                "metrics_port": self.metrics_port,
                "destination": str(self.config.destination),
                "queue": self._queue_kind(),
                "model_version": self.image.model_version,
                "pending": self.spool.depth("incoming") + self.spool.depth("outbox"),
            },
        )

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting, let running work finish within ``timeout_s`` (default
        ``FUNDUS_SHUTDOWN_TIMEOUT_S``); anything unfinished stays in the spool for the next start."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        self._ready = False
        self.metrics.base.ready.set(0)
        if self.scp is not None:
            self.scp.stop(timeout)
        if self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._stop_async(timeout), timeout=timeout + 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)
            if not self._loop.is_running():
                self._loop.close()
        if self.http is not None:
            self.http.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("dicom node stopped")

    def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, stop gracefully (main thread only)."""
        wake = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            wake.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not wake.wait(timeout=1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def _queue_kind(self) -> str:
        if self.settings.redis_url:
            return "redis"
        return "embedded" if self.runner is not None else "model-process"

    def readiness(self) -> tuple[bool, str]:
        """``(True, "ok")`` once the SCP listens and the queue would serve a job now."""
        if not self._ready or self._loop is None or self.queue is None:
            return False, "starting" if not self._stopped.is_set() else "stopping"
        return self._call(self.queue.readiness(), timeout=5.0)

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)

    # -- start-up ----------------------------------------------------------------------------------------

    def _load_model(self) -> ImageContext:
        settings = self.settings
        if settings.redis_url or settings.model_socket:
            # The model runs elsewhere (Redis workers, or the local model process of `fundus serve
            # --workers N`); the node needs the artifact's working size and version only.
            from service.app import _metadata_only_info

            info = _metadata_only_info(Path(settings.weights))
            working_size, version, preset, device = info.working_size, info.version, info.preset, info.device
        else:
            runner, artifact = load_runner(settings, on_batch=self.metrics.base.observe_batch)
            if settings.warmup:
                runner.warm_up((1,))
            self.runner = runner
            working_size, version = int(artifact.config.working_size), artifact.version
            preset, device = artifact.preset, str(runner.device)
        quality = load_quality(settings.quality_weights) if settings.quality_weights else None
        self.metrics.base.set_model(version, preset, device)
        return ImageContext(
            settings=settings,
            codecs=self.codecs,
            working_size=working_size,
            model_version=version,
            quality=quality,
        )

    async def _start_async(self) -> None:
        settings = self.settings
        assert self.image is not None
        queue = build_queue(
            settings,
            self.runner,
            working_size=self.image.working_size,
            on_batch_failure=self.metrics.base.batch_failures.inc,
        )
        await queue.start()
        self.queue = queue
        self.metrics.base.track_queue_depth(queue.depth)
        register = getattr(queue, "register_metrics", None)
        if register is not None:
            register(self.metrics.registry)
        self.forwarder = Forwarder(
            spool=self.spool,
            destination=self.config.destination,
            calling_ae_title=self.config.ae_title,
            metrics=self.metrics,
            associations=settings.dimse_send_associations,
            retry_initial_s=settings.dimse_retry_initial_s,
            retry_max_s=settings.dimse_retry_max_s,
            max_attempts=settings.dimse_send_max_attempts,
            acse_timeout_s=settings.dimse_acse_timeout_s,
            dimse_timeout_s=settings.dimse_dimse_timeout_s,
            network_timeout_s=settings.dimse_network_timeout_s,
        )
        outbox = await self._cpu(self.spool.outbox_items)
        for item in outbox:
            self.forwarder.add(item)
        self.forwarder.start()
        self._work = asyncio.Queue()
        for item_id in await self._cpu(self.spool.pending_incoming):
            self._enqueue(item_id)
        self._workers = [
            asyncio.create_task(self._process_loop(), name=f"fundus-dimse-process-{index}")
            for index in range(settings.dimse_concurrency)
        ]
        if outbox or self._known:
            log.info("resuming spooled items", extra={"incoming": len(self._known), "outbox": len(outbox)})

    async def _stop_async(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self._draining = True  # processing tasks finish what they hold and take nothing new
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the processing tasks' counter
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.forwarder is not None:
            await self.forwarder.stop(max(0.0, deadline - time.monotonic()))
        if self.queue is not None:
            await self.queue.stop(max(0.0, deadline - time.monotonic()))

    # -- processing --------------------------------------------------------------------------------------

    def _received(self, item_id: str) -> None:
        """From an association thread: a new item is durable in ``incoming/``."""
        loop = self._loop
        if loop is not None and not self._stopped.is_set():
            loop.call_soon_threadsafe(self._enqueue, item_id)

    def _enqueue(self, item_id: str) -> None:
        if item_id in self._known or self._work is None:
            return
        self._known.add(item_id)
        self._work.put_nowait(item_id)

    async def _cpu(self, func: Callable[..., T], *args: Any) -> T:
        context = contextvars.copy_context()
        call = functools.partial(context.run, func, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _process_loop(self) -> None:
        assert self._work is not None
        while True:
            item_id = await self._work.get()
            if self._draining:
                self._done(item_id)  # still in incoming/: the next start processes it
                continue
            self._active += 1
            self.metrics.in_process.inc()
            try:
                await self._process(item_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one instance stop the node
                log.exception("processing failed unexpectedly", extra={"item": item_id})
                await self._quarantine(item_id, "internal_error", f"unexpected {type(exc).__name__}", 500)
            finally:
                self._active -= 1
                self.metrics.in_process.dec()

    async def _process(self, item_id: str) -> None:
        if not await self._cpu(self.spool.has_incoming, item_id):
            self._done(item_id)
            return
        image = self.image
        assert image is not None and self.queue is not None and self.forwarder is not None
        data = await self._cpu(self.spool.read_incoming, item_id)
        tasks = [Task.ENHANCE, *([Task.SEGMENT] if self.settings.dimse_segment else [])]
        # A fresh id per try: with Redis the request id is the idempotency key of an accepted job.
        token = secrets.token_hex(4)
        request_ids = {task: f"dimse-{item_id}-{task.value}-{token}" for task in tasks}
        # As POST /enhance does: tell the embedded batcher its jobs are on their way while they are
        # decoded and cropped, so an idle model waits for them instead of running a smaller batch.
        hinted = isinstance(self.queue, EmbeddedQueue)
        if hinted:
            for request_id in request_ids.values():
                self.queue.announce(request_id)
        try:
            clock = time.perf_counter()
            try:
                prepared = await self._cpu(prepare_instance, image, data)
            except ApiError as exc:
                await self._quarantine(item_id, exc.code, exc.message, exc.status_code)
                return
            self.metrics.base.preprocess_duration.observe(time.perf_counter() - clock)
            results = await self._run_model(item_id, prepared, request_ids)
        finally:
            if hinted:
                for request_id in request_ids.values():
                    self.queue.retract(request_id)
        if results is None:
            return
        clock = time.perf_counter()
        try:
            parts = await self._cpu(self._derive, image, prepared, results, item_id)
        except CodecError:
            await self._quarantine(
                item_id, "dicom_write_failed", "the derived instance cannot be written from this header", 400
            )
            return
        self.metrics.base.postprocess_duration.observe(time.perf_counter() - clock)
        try:
            item = await self._cpu(self.spool.commit, item_id, parts)
        except OSError as exc:
            log.error("spool commit failed; retrying", extra={"item": item_id, "errno": exc.errno})
            self._retry(item_id, "spool_error")
            return
        self._done(item_id)
        self.forwarder.add(item)

    async def _run_model(
        self, item_id: str, prepared: Prepared, request_ids: dict[Task, str]
    ) -> dict[Task, JobResult] | None:
        """Submit the instance's jobs (enhance, and segment when configured) and await them all; None
        when the item was rescheduled or quarantined instead."""
        assert self.queue is not None
        tasks = list(request_ids)
        deadline = time.time() + self.settings.request_timeout_s
        jobs = [model_job(request_ids[task], task, prepared, deadline) for task in tasks]
        answers = await asyncio.gather(*(self.queue.submit(job) for job in jobs), return_exceptions=True)
        failure = next((answer for answer in answers if isinstance(answer, BaseException)), None)
        if failure is None:
            results = dict(zip(tasks, answers, strict=True))
            first = results[Task.ENHANCE]
            assert isinstance(first, JobResult)
            self.metrics.base.queue_wait.observe(first.queue_seconds)
            self._inference_failures.pop(item_id, None)
            return results  # type: ignore[return-value]
        if isinstance(failure, InferenceFailed):
            count = self._inference_failures.get(item_id, 0) + 1
            self._inference_failures[item_id] = count
            if count >= MAX_INFERENCE_FAILURES:
                self._inference_failures.pop(item_id, None)
                await self._quarantine(item_id, failure.code, failure.message, failure.status_code)
                return None
        if isinstance(failure, QueueError):
            self._retry(item_id, failure.code)
            return None
        raise failure

    def _derive(
        self, image: ImageContext, prepared: Prepared, results: dict[Task, JobResult], item_id: str
    ) -> list[NewPart]:
        """Encode the derived instances (CPU pool); the original first when it is forwarded too."""
        parts: list[NewPart] = []
        if self.settings.dimse_forward_original:
            sop_class, syntax = _identity(self.spool.incoming_path(item_id).read_bytes())
            parts.append(NewPart("0-original.dcm", "original", sop_class, syntax, link_incoming=True))
        trust = trust_report(image, prepared, results[Task.ENHANCE])
        trust.observe(self.metrics.base)
        enhanced = encode_enhanced(image, prepared, results[Task.ENHANCE], trust)
        parts.append(NewPart("1-enhanced.dcm", "enhanced", *_identity(enhanced), data=enhanced))
        if Task.SEGMENT in results:
            segmentation = encode_segmentation(image, prepared, results[Task.SEGMENT])
            identity = _identity(segmentation)
            parts.append(NewPart("2-segmentation.dcm", "segmentation", *identity, data=segmentation))
        return parts

    def _retry(self, item_id: str, code: str) -> None:
        """Process the item again after a back-off (it stays in ``incoming/``)."""
        attempts = self._attempts.get(item_id, 0) + 1
        self._attempts[item_id] = attempts
        delay = backoff_s(attempts, self.settings.dimse_retry_initial_s, self.settings.dimse_retry_max_s)
        log.warning(
            "processing deferred", extra={"item": item_id, "reason": code, "retry_in_s": round(delay, 2)}
        )
        assert self._loop is not None and self._work is not None
        self._loop.call_later(delay, self._work.put_nowait, item_id)

    def _done(self, item_id: str) -> None:
        self._known.discard(item_id)
        self._attempts.pop(item_id, None)

    async def _quarantine(self, item_id: str, code: str, message: str, status: int) -> None:
        reason = {"stage": "process", "code": code, "message": message, "http_status": status}
        try:
            await self._cpu(self.spool.quarantine, item_id, reason)
        except OSError as exc:
            log.error("quarantine failed; retrying", extra={"item": item_id, "errno": exc.errno})
            self._retry(item_id, "spool_error")
            return
        self._done(item_id)
        self.metrics.failed.labels(stage="process", reason=code).inc()
        log.warning("instance quarantined", extra={"item": item_id, "reason": code})


def _identity(data: bytes) -> tuple[str, str]:
    """(SOP Class UID, Transfer Syntax UID) from a Part-10 file's meta header."""
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    meta = header.file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
