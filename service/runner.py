"""The model batch runner shared by the embedded batcher and the Redis worker.

``ModelRunner.run_jobs`` takes jobs of any endpoint, stacks their uint8 [3, S, S] inputs into one
[B, 3, S, S] batch, runs one model pass that yields what the batch needs (enhanced image and/or vessel
probability) and splits the answer into one :class:`JobResult` per job. On CUDA out-of-memory the
batch is halved and retried, down to single images, before giving up. The model and its inputs use
the device's convolution memory layout (``channels_last`` on the CPU, see
:func:`model.device.conv_memory_format`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.artifact import Artifact, load_artifact
from model.device import (
    GLIBC_HEAP_TUNABLES,
    autocast,
    conv_memory_format,
    reuse_freed_memory,
    select_device,
)
from model.magenet import MageNet
from model.trust import (
    StructureFidelity,
    field_of_view,
    mean_in_fov,
    stage_disagreement,
    structure_fidelity,
    uncertainty_to_uint8,
)
from service.queue.base import Job, JobResult, Task
from service.settings import Settings

log = logging.getLogger("fundus.runner")

BatchObserver = Callable[[int, float], None]


@dataclass
class BatchOutput:
    """Model answers for a batch: images uint8 [B, 3, S, S] and vessels uint8 [B, S, S], when asked for;
    with trust signals, for the images: uncertainty maps uint8 [B, S, S], their means and the
    structure fidelity per image (see :mod:`model.trust`)."""

    images: np.ndarray | None
    vessels: np.ndarray | None
    uncertainty: np.ndarray | None = None
    uncertainty_means: list[float] | None = None
    fidelity: list[StructureFidelity] | None = None


def _join(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    return None if first is None or second is None else np.concatenate([first, second])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _to_uint8(values: torch.Tensor) -> np.ndarray:
    """[0, 1] float tensor (any layout) → rounded, C-contiguous uint8 numpy array on the CPU."""
    scaled = values.float().clamp_(0.0, 1.0).mul_(255.0).add_(0.5).to(torch.uint8)
    return scaled.cpu().contiguous().numpy()


class ModelRunner:
    """Runs uint8 batches through a loaded MAGE-Net on one device.

    Args:
        model: the network, in eval mode, already on ``device``; the runner converts it to the
            device's convolution memory layout.
        device: where the model lives.
        working_size: S, the square input size every job must have.
        on_batch: called with (batch size, seconds) once per executed model pass (metrics).
        trust_signals: with enhanced images, also compute the uncertainty map and the structure
            fidelity (:mod:`model.trust`; one extra pass of the vessel branch).
    """

    def __init__(
        self,
        model: MageNet,
        device: torch.device,
        working_size: int,
        *,
        on_batch: BatchObserver | None = None,
        trust_signals: bool = True,
    ) -> None:
        self.memory_format = conv_memory_format(device)
        self.model = model.to(memory_format=self.memory_format)
        self.device = device
        self.working_size = working_size
        self.on_batch = on_batch
        self.trust_signals = trust_signals

    def infer(self, pixels: np.ndarray, *, need_image: bool, need_vessels: bool) -> BatchOutput:
        """One pass over uint8 [B, 3, S, S]; halves the batch and retries on out-of-memory."""
        expected = (3, self.working_size, self.working_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 [B, {expected}], got {pixels.dtype} {tuple(pixels.shape)}")
        try:
            return self._forward(pixels, need_image=need_image, need_vessels=need_vessels)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or len(pixels) == 1:
                raise
            log.warning("out of memory; splitting the batch", extra={"batch_size": len(pixels)})
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            first = self.infer(pixels[:half], need_image=need_image, need_vessels=need_vessels)
            second = self.infer(pixels[half:], need_image=need_image, need_vessels=need_vessels)
            return BatchOutput(
                images=_join(first.images, second.images),
                vessels=_join(first.vessels, second.vessels),
                uncertainty=_join(first.uncertainty, second.uncertainty),
                uncertainty_means=None
                if first.uncertainty_means is None
                else [*first.uncertainty_means, *(second.uncertainty_means or [])],
                fidelity=None if first.fidelity is None else [*first.fidelity, *(second.fidelity or [])],
            )

    def _forward(self, pixels: np.ndarray, *, need_image: bool, need_vessels: bool) -> BatchOutput:
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self.device, non_blocking=True).float().div_(255.0)
            batch = batch.contiguous(memory_format=self.memory_format)
            if need_image and self.trust_signals:
                return self._forward_with_trust(batch, need_vessels=need_vessels)
            with autocast(self.device):
                image, vessels = self.model.infer(batch, need_image=need_image, need_vessels=need_vessels)
            return BatchOutput(
                images=None if image is None else _to_uint8(image),
                vessels=None if vessels is None else _to_uint8(vessels[:, 0]),
            )

    def _forward_with_trust(self, batch: torch.Tensor, *, need_vessels: bool) -> BatchOutput:
        """The enhanced images plus the trust signals: one full pass (both stage images and the input's
        vessel map) and one pass of the vessel branch over the output."""
        with autocast(self.device):
            output = self.model(batch)
            image = output.images[0].clamp(0.0, 1.0)
            vessels_out = self.model.vessels.predict(image)[:, 0].float()
        vessels_in = torch.softmax(output.vessel_logits[-1].float(), dim=1)[:, 1]
        disagreement = stage_disagreement(output.images[0], output.images[1])
        fov = field_of_view(batch)
        return BatchOutput(
            images=_to_uint8(image),
            vessels=_to_uint8(vessels_in) if need_vessels else None,
            uncertainty=uncertainty_to_uint8(disagreement),
            uncertainty_means=mean_in_fov(disagreement, fov),
            fidelity=structure_fidelity(vessels_in, vessels_out, fov),
        )

    def run_jobs(self, jobs: Sequence[Job]) -> list[JobResult]:
        """One model pass for ``jobs`` (any mix of tasks); results in the same order."""
        if not jobs:
            return []
        started = time.time()
        need_image = any(job.task is Task.ENHANCE for job in jobs)
        need_vessels = any(job.task is Task.SEGMENT for job in jobs)
        pixels = np.stack([job.pixels for job in jobs])
        clock = time.perf_counter()
        output = self.infer(pixels, need_image=need_image, need_vessels=need_vessels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - clock
        if self.on_batch is not None:
            self.on_batch(len(jobs), seconds)
        results = []
        for index, job in enumerate(jobs):
            enhance = job.task is Task.ENHANCE
            results.append(
                JobResult(
                    image=output.images[index]
                    if job.task is Task.ENHANCE and output.images is not None
                    else None,
                    vessels=(
                        output.vessels[index]
                        if job.task is Task.SEGMENT and output.vessels is not None
                        else None
                    ),
                    queue_seconds=max(0.0, started - job.enqueued_at),
                    inference_seconds=seconds,
                    batch_size=len(jobs),
                    uncertainty=output.uncertainty[index]
                    if enhance and output.uncertainty is not None
                    else None,
                    uncertainty_mean=output.uncertainty_means[index]
                    if enhance and output.uncertainty_means is not None
                    else None,
                    fidelity=output.fidelity[index].as_dict()
                    if enhance and output.fidelity is not None
                    else None,
                )
            )
        return results

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run zero batches through both outputs (allocator, cudnn autotune); returns seconds taken."""
        clock = time.perf_counter()
        size = self.working_size
        for count in batch_sizes:
            self.infer(np.zeros((count, 3, size, size), dtype=np.uint8), need_image=True, need_vessels=True)
        return time.perf_counter() - clock


class DeviceSettingError(ValueError):
    """``FUNDUS_DEVICE`` names a device this machine does not have (or no device at all)."""


def prepare_model_process(settings: Settings) -> None:
    """Process-wide set-up for a process that runs the model; call first, before any thread starts.

    With ``FUNDUS_REUSE_FREED_MEMORY`` (default) the heap keeps freed activations for the next batch
    (:func:`model.device.reuse_freed_memory`), and processes started from this one (uvicorn workers)
    get the same through ``GLIBC_TUNABLES`` unless it already sets malloc tunables.
    """
    if not settings.reuse_freed_memory:
        return
    reuse_freed_memory()
    inherited = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." not in inherited:
        os.environ["GLIBC_TUNABLES"] = ":".join(part for part in (inherited, GLIBC_HEAP_TUNABLES) if part)


def load_runner(settings: Settings, *, on_batch: BatchObserver | None = None) -> tuple[ModelRunner, Artifact]:
    """Load ``settings.weights`` into a runner on ``FUNDUS_DEVICE`` with ``FUNDUS_TORCH_THREADS``.

    Raises :class:`DeviceSettingError` for a bad device and
    :class:`model.artifact.ArtifactError` for missing or corrupt weights. No warm-up.
    """
    try:
        device = select_device(settings.device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceSettingError(str(exc)) from exc
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    artifact = load_artifact(settings.weights, device)
    runner = ModelRunner(
        artifact.model,
        device,
        int(artifact.config.working_size),
        on_batch=on_batch,
        trust_signals=settings.trust_signals,
    )
    return runner, artifact
