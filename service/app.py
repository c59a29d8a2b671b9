"""The FastAPI application: ``create_app(settings)`` with a lifespan that loads, warms and serves.

Start-up: select the device, load and verify the weight artifact (a clear error when it is missing
or corrupt), run a warm-up pass, start the queue backend, then report ready. Shutdown: refuse new
image requests with 503, let the queue drain in-flight jobs within ``FUNDUS_SHUTDOWN_TIMEOUT_S``.
With ``FUNDUS_REDIS_URL`` set, the API process does not load the network at all: it only reads the
artifact's metadata (working size, version) and leaves the model to the workers; the same holds for
the API processes of ``fundus serve --workers N``, which share one local model process
(``FUNDUS_MODEL_SOCKET``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from safetensors import safe_open
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.artifact import ArtifactError, read_metadata
from model.quality import load_quality
from service.codecs import default_registry
from service.docs import API_DESCRIPTION, install_offline_docs
from service.errors import error_body, install_error_handlers, retry_after_header
from service.logging import configure_logging, reset_request_id, set_request_id
from service.metrics import Metrics, endpoint_label
from service.queue.factory import build_queue
from service.routes import images, ops, quality
from service.runner import DeviceSettingError, QualityWeightsError, load_runner
from service.settings import Settings, load_settings
from service.state import ModelInfo, ServiceState
from service.viewer import install_viewer

log = logging.getLogger("fundus.app")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
IMAGE_PATHS = frozenset({"/enhance", "/segment", "/degrade", "/render", "/quality"})
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class StartupError(RuntimeError):
    """The service cannot start (weights missing or corrupt, device unavailable)."""


def _valid_request_id(value: str | None) -> str:
    if value and _REQUEST_ID.match(value):
        return value
    return secrets.token_hex(16)


class RequestContextMiddleware:
    """Request id, model-version header, draining refusal, request metrics and one access-log line.

    Pure ASGI (not ``BaseHTTPMiddleware``) so the route can still watch ``receive`` for a disconnect.
    Exceptions that escape the app become a JSON 500 here, so even those carry ``X-Request-ID``.
    """

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = _valid_request_id(headers.get("x-request-id"))
        scope.setdefault("state", {})
        scope["state"]["arrived"] = time.time()
        scope["state"]["request_id"] = request_id
        token = set_request_id(request_id)
        path: str = scope.get("path", "")
        endpoint = endpoint_label(path)
        metrics = self.state.metrics
        status = 500
        started = False
        clock = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                extra = [
                    (b"x-request-id", request_id.encode()),
                    (b"x-model-version", self.state.model_version.encode()),
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        metrics.inflight.inc()
        try:
            if self.state.draining and path in IMAGE_PATHS:
                metrics.rejected.labels(reason="shutting_down").inc()
                await self._send_json(send_wrapper, 503, "shutting_down", "the service is shutting down", 5)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"path": path})
            if not started:
                await self._send_json(send_wrapper, 500, "internal_error", "internal server error", None)
        finally:
            duration = time.perf_counter() - clock
            metrics.inflight.dec()
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.request_duration.labels(endpoint=endpoint).observe(duration)
            # Health probes arrive every few seconds: at DEBUG unless they fail.
            level = logging.DEBUG if path in HEALTH_PATHS and status < 400 else logging.INFO
            log.log(
                level,
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(duration * 1000.0, 1),
                },
            )
            reset_request_id(token)

    @staticmethod
    async def _send_json(send: Send, status: int, code: str, message: str, retry_after: float | None) -> None:
        body = json.dumps(error_body(code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in retry_after_header(retry_after).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _parameter_count(path: Path) -> int:
    """Sum of tensor sizes from the safetensors header, without materialising the weights."""
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118
            count = 1
            for dim in handle.get_slice(name).get_shape():
                count *= int(dim)
            total += count
    return total


def _metadata_only_info(path: Path) -> ModelInfo:
    meta = read_metadata(path)
    try:
        working_size = int(meta["config"]["working_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path.name} has no working size in its config: {exc}") from exc
    sha = str(meta["tensors_sha256"])
    preset = str(meta.get("preset") or "custom")
    return ModelInfo(
        preset=preset,
        version=f"{preset}-{sha[:12]}",
        sha256=sha,
        parameter_count=_parameter_count(path),
        working_size=working_size,
        device="workers",
        created=str(meta.get("created", "")),
        training=dict(meta.get("training") or {}),
        metrics=dict(meta.get("metrics") or {}),
    )


async def _start(state: ServiceState) -> None:
    settings = state.settings
    if settings.redis_url or settings.model_socket:
        # The model runs elsewhere (Redis workers, or the local model process of `--workers N`).
        state.not_ready_reason = "reading weight metadata"
        try:
            state.info = await state.cpu(_metadata_only_info, Path(settings.weights))
        except ArtifactError as exc:
            raise StartupError(f"cannot serve weights {settings.weights}: {exc}") from exc
        if not settings.redis_url:
            state.info.device = f"model process ({settings.device})"
        runner = None
    else:
        state.not_ready_reason = "loading weights"
        try:
            runner, artifact = await state.cpu(load_runner, settings, on_batch=state.metrics.observe_batch)
        except QualityWeightsError as exc:
            raise StartupError(str(exc)) from exc
        except ArtifactError as exc:
            raise StartupError(f"cannot load weights {settings.weights}: {exc}") from exc
        except DeviceSettingError as exc:
            raise StartupError(f"FUNDUS_DEVICE: {exc}") from exc
        working_size = int(artifact.config.working_size)
        state.info = ModelInfo(
            preset=artifact.preset,
            version=artifact.version,
            sha256=artifact.sha256,
            parameter_count=artifact.parameter_count,
            working_size=working_size,
            device=str(runner.device),
            created=artifact.created,
            training=artifact.training,
            metrics=artifact.metrics,
        )
        state.runner = runner
        if settings.warmup:
            state.not_ready_reason = "warming up"
            seconds = await state.cpu(runner.warm_up, (1,))
            log.info("warm-up done", extra={"seconds": round(seconds, 3)})
    if settings.quality_weights:
        state.not_ready_reason = "loading the quality grader"
        try:
            state.quality = await state.cpu(load_quality, settings.quality_weights)
        except (OSError, ValueError, KeyError) as exc:
            raise StartupError(f"cannot load the quality grader {settings.quality_weights}: {exc}") from exc
    state.not_ready_reason = "starting the queue"
    queue = build_queue(
        settings,
        runner,
        working_size=state.info.working_size,
        on_batch_failure=state.metrics.batch_failures.inc,
    )
    await queue.start()
    state.queue = queue
    state.metrics.track_queue_depth(queue.depth)
    register_queue_metrics = getattr(queue, "register_metrics", None)
    if register_queue_metrics is not None:
        register_queue_metrics(state.metrics.registry)
    state.metrics.set_model(state.info.version, state.info.preset, state.info.device)
    state.ready = True
    state.not_ready_reason = ""
    state.metrics.ready.set(1)
    log.info(
        "ready",
        extra={
            "model_version": state.info.version,
            "device": state.info.device,
            "queue": _queue_kind(settings),
        },
    )


def _queue_kind(settings: Settings) -> str:
    if settings.redis_url:
        return "redis"
    return "model-process" if settings.model_socket else "embedded"


async def _stop(state: ServiceState) -> None:
    state.draining = True
    state.ready = False
    state.metrics.ready.set(0)
    if state.queue is not None:
        await state.queue.stop(state.settings.shutdown_timeout_s)
    state.executor.shutdown(wait=False, cancel_futures=True)
    state.metrics.retire_process()
    log.info("stopped")


def share_cores_with_pool(pool_threads: int) -> int:
    """Set OpenCV's threads per call to the cores each request-pool thread has to itself.

    The pool already runs ``pool_threads`` requests' decode, FOV and mapping side by side; OpenCV
    spreading every call over all cores as well oversubscribes them (its idle workers spin). On two
    cores that cost about 8 % more CPU per 512² request and bought no latency
    (``bench/serve_bench.py --identity`` with ``OPENCV_FOR_THREADS_NUM`` 1 vs 2). Where
    ``OPENCV_FOR_THREADS_NUM`` is set, OpenCV has taken it already and it stays. Returns the count
    in force.
    """
    import cv2

    if not os.environ.get("OPENCV_FOR_THREADS_NUM"):
        cv2.setNumThreads(max(1, (os.cpu_count() or 1) // max(1, pool_threads)))
    return cv2.getNumThreads()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing heavy happens until the lifespan starts (``with TestClient(app)``/uvicorn)."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    share_cores_with_pool(settings.cpu_threads)
    state = ServiceState(
        settings=settings,
        metrics=Metrics(),
        codecs=default_registry(),
        executor=ThreadPoolExecutor(max_workers=settings.cpu_threads, thread_name_prefix="fundus-cpu"),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await _start(state)
        except StartupError as exc:
            log.error("start-up failed: %s", exc)
            await _stop(state)
            raise
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="fundus-enhance",
        version="0.1.0",
        summary="T-MAGE-Net enhancement, vessel segmentation and Cofe-Net degradation of fundus photographs",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_offline_docs(app)
    install_viewer(app)
    app.state.service = state
    app.state.settings = settings
    app.state.metrics = state.metrics
    install_error_handlers(app)
    app.include_router(images.router)
    app.include_router(quality.router)
    app.include_router(ops.router)
    app.add_middleware(RequestContextMiddleware, state=state)
    return app
