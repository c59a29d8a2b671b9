"""Choosing the queue backend: Redis Streams when ``FUNDUS_REDIS_URL`` is set, the local model process
when ``FUNDUS_MODEL_SOCKET`` is (``fundus serve --workers N``), else the embedded batcher."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from service.queue.base import InferenceQueue
from service.runner import ModelRunner
from service.settings import Settings


def build_queue(
    settings: Settings,
    runner: ModelRunner | None,
    *,
    working_size: int | None = None,
    on_batch_failure: Callable[[], None] | None = None,
) -> InferenceQueue:
    """The backend for ``settings``; ``runner`` is required by the embedded one only (without a runner,
    ``model_socket`` selects the local model process).

    Args:
        settings: service settings (``redis_url`` picks Redis Streams, ``model_socket`` the model process).
        runner: the local model runner (embedded queue).
        working_size: S of the uint8 [3, S, S] jobs (lets the Redis backend refuse foreign shapes).
        on_batch_failure: called once per failed model pass (embedded queue metrics).

    The Redis module is imported lazily so an embedded-only deployment never needs it.
    """
    if settings.redis_url:
        redis_backend = importlib.import_module("service.queue.redis_backend")
        queue: InferenceQueue = redis_backend.RedisQueue(settings, working_size=working_size)
        return queue
    if settings.model_socket and runner is None:
        from service.queue.ipc_backend import IpcQueue

        return IpcQueue(settings.model_socket, working_size=working_size)
    if runner is None:
        raise ValueError("the embedded queue needs a model runner")
    from service.queue.embedded import EmbeddedQueue

    return EmbeddedQueue(
        runner.run_jobs,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        on_batch_failure=on_batch_failure,
    )
