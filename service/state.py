"""Per-app runtime state (settings, metrics, codecs, model description, queue) and how routes reach it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from model.quality import QualityModel
from service.codecs import CodecRegistry
from service.metrics import Metrics
from service.queue.base import InferenceQueue
from service.runner import ModelRunner
from service.settings import Settings

T = TypeVar("T")


@dataclass
class ModelInfo:
    """What the service tells clients about the served weights."""

    preset: str
    version: str
    sha256: str
    parameter_count: int
    working_size: int
    device: str
    created: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "version": self.version,
            "sha256": self.sha256,
            "parameter_count": self.parameter_count,
            "working_size": self.working_size,
            "device": self.device,
            "created": self.created,
            "training": public_training(self.training),
            "metrics": self.metrics,
        }


#: Training-summary entries that describe the training host or its file system, not the weights.
PRIVATE_TRAINING_KEYS = frozenset({"hardware", "run_dir", "weights"})


def public_training(summary: Any) -> Any:
    """The training summary without host details (platform, hardware, file paths), at any depth."""
    if isinstance(summary, dict):
        return {k: public_training(v) for k, v in summary.items() if k not in PRIVATE_TRAINING_KEYS}
    if isinstance(summary, list):
        return [public_training(v) for v in summary]
    return summary


@dataclass
class ServiceState:
    """Everything the routes need, created by ``create_app`` and completed by the lifespan."""

    settings: Settings
    metrics: Metrics
    codecs: CodecRegistry
    executor: ThreadPoolExecutor
    info: ModelInfo | None = None
    runner: ModelRunner | None = None
    queue: InferenceQueue | None = None
    quality: QualityModel | None = None
    ready: bool = False
    draining: bool = False
    not_ready_reason: str = "starting"

    _degrade_slots: asyncio.Semaphore | None = None

    def degrade_slots(self) -> asyncio.Semaphore:
        """The semaphore that caps concurrent ``/degrade`` work (created in the serving loop)."""
        if self._degrade_slots is None:
            self._degrade_slots = asyncio.Semaphore(self.settings.max_degrade_jobs)
        return self._degrade_slots

    async def cpu(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-bound ``func`` in the image thread pool (keeps the request id context)."""
        context = contextvars.copy_context()
        call = functools.partial(context.run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    @property
    def model_version(self) -> str:
        return self.info.version if self.info is not None else "unloaded"


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state
