"""The queue interface shared by the embedded micro-batcher and the Redis Streams backend.

The API process turns every request into a :class:`Job` holding the preprocessed working-size
tensor (no patient data: no file names, no DICOM tags) and awaits ``InferenceQueue.submit``.
Backends batch jobs of any endpoint together: one model pass yields both the enhanced image and the
vessel map, and each job takes what its endpoint asked for.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Task(StrEnum):
    """What a job needs from the model pass."""

    ENHANCE = "enhance"
    SEGMENT = "segment"


@dataclass
class Job:
    """One request's model work.

    Attributes:
        request_id: opaque id echoed in logs and replies (never a file name or patient id).
        task: which output the caller needs.
        pixels: uint8 array [3, S, S] at the working size S (RGB, FOV-cropped, square).
        deadline: absolute ``time.time()`` after which the result is useless (never run it then).
        enqueued_at: ``time.time()`` when the job entered the queue (for the queue-wait metric).
    """

    request_id: str
    task: Task
    pixels: np.ndarray
    deadline: float
    enqueued_at: float = field(default_factory=time.time)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline


@dataclass
class JobResult:
    """The model's answer for one job.

    Attributes:
        image: uint8 [3, S, S] enhanced image (``Task.ENHANCE``), else ``None``.
        vessels: uint8 [S, S] vessel probability × 255 (``Task.SEGMENT``), else ``None``.
        queue_seconds: enqueue → batch start.
        inference_seconds: the whole batch's model time.
        batch_size: how many jobs shared the model pass.
        uncertainty: uint8 [S, S] stage-disagreement map (``Task.ENHANCE`` with trust signals).
        uncertainty_mean: its mean inside the field of view, on [0, 1].
        fidelity: ``{"dice", "removed", "added"}`` of the vessel maps of input and output.
        quality_before / quality_after: P(good) of the input and of the output, when the model
            process grades them (see :func:`model.inference.served_pass`).
    """

    image: np.ndarray | None
    vessels: np.ndarray | None
    queue_seconds: float
    inference_seconds: float
    batch_size: int
    uncertainty: np.ndarray | None = None
    uncertainty_mean: float | None = None
    fidelity: dict[str, float] | None = None
    quality_before: float | None = None
    quality_after: float | None = None


class QueueError(Exception):
    """Base of the errors a queue raises to the API; each maps to one HTTP status."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class QueueFull(QueueError):
    """Admission control refused the job (global queue depth at its limit) → 429 + Retry-After."""

    status_code = 429
    code = "queue_full"


class BackendUnavailable(QueueError):
    """The queue backend (e.g. Redis) or every worker is unreachable → 503 + Retry-After."""

    status_code = 503
    code = "backend_unavailable"


class DeadlineExceeded(QueueError):
    """The job's deadline passed before it could run or before its reply arrived → 504."""

    status_code = 504
    code = "deadline_exceeded"


class DuplicateRequest(QueueError):
    """A request with the same X-Request-ID is already queued or running here → 409."""

    status_code = 409
    code = "duplicate_request"


class InferenceFailed(QueueError):
    """The model pass failed for this job (bad batch, poison entry moved to dead letters) → 500-free 503."""

    status_code = 503
    code = "inference_failed"


class InferenceQueue(abc.ABC):
    """A backend that batches :class:`Job` objects through the model."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin serving (start background tasks, connect)."""

    @abc.abstractmethod
    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting jobs and finish in-flight ones within ``drain_timeout_s``."""

    @abc.abstractmethod
    async def submit(self, job: Job) -> JobResult:
        """Queue ``job`` and wait for its result; raises a :class:`QueueError` subclass."""

    @abc.abstractmethod
    def depth(self) -> int:
        """Jobs waiting (not yet in a running batch), as last known."""

    @abc.abstractmethod
    async def readiness(self) -> tuple[bool, str]:
        """``(True, "ok")`` when jobs would be served now, else ``(False, reason)``."""
