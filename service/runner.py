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
from typing import Any

import numpy as np
import torch

from model.artifact import Artifact, ArtifactError, load_artifact
from model.cuda_graphs import GraphedPasses, batch_buckets
from model.device import GLIBC_HEAP_TUNABLES, conv_memory_format, reuse_freed_memory, select_device
from model.inference import Mode, served_pass
from model.magenet import MageNet
from model.quality import QualityModel, load_quality
from model.trust import StructureFidelity, fidelity_from_counts
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
    quality_before: list[float] | None = None
    quality_after: list[float] | None = None


def _join(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    return None if first is None or second is None else np.concatenate([first, second])


def _join_lists(first: list[Any] | None, second: list[Any] | None) -> list[Any] | None:
    return None if first is None or second is None else [*first, *second]


def _floats(value: torch.Tensor | None) -> list[float] | None:
    return None if value is None else [round(v, 5) for v in value.float().tolist()]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _numpy(value: torch.Tensor) -> np.ndarray:
    """A host tensor (any layout) as a C-contiguous numpy array."""
    return value.contiguous().numpy()


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
        cuda_graphs: on CUDA, replay the pass as CUDA graphs (:mod:`model.cuda_graphs`).
        max_batch_size: the largest batch the queue forms (the graphs' largest bucket).
        grader: the quality grader, graded inside the pass for enhanced images (moved to ``device``).
    """

    def __init__(
        self,
        model: MageNet,
        device: torch.device,
        working_size: int,
        *,
        on_batch: BatchObserver | None = None,
        trust_signals: bool = True,
        cuda_graphs: bool = False,
        max_batch_size: int = 8,
        grader: QualityModel | None = None,
    ) -> None:
        self.memory_format = conv_memory_format(device, inference=True)
        self.model = model.to(memory_format=self.memory_format)
        self.device = device
        self.working_size = working_size
        self.on_batch = on_batch
        self.trust_signals = trust_signals
        self.grader = None if grader is None else grader.to(device)
        self.graphs: GraphedPasses | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = GraphedPasses(
                self._device_pass, device, working_size, batch_buckets(max_batch_size)
            )

    def _device_pass(self, pixels: torch.Tensor, mode: Mode) -> dict[str, torch.Tensor]:
        """The served pass over a uint8 device batch (see :func:`model.inference.served_pass`)."""
        return served_pass(
            self.model,
            pixels,
            mode=mode,
            trust=self.trust_signals,
            memory_format=self.memory_format,
            grader=self.grader,
        )

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
                uncertainty_means=_join_lists(first.uncertainty_means, second.uncertainty_means),
                fidelity=_join_lists(first.fidelity, second.fidelity),
                quality_before=_join_lists(first.quality_before, second.quality_before),
                quality_after=_join_lists(first.quality_after, second.quality_after),
            )

    def _forward(self, pixels: np.ndarray, *, need_image: bool, need_vessels: bool) -> BatchOutput:
        mode: Mode = "image" if need_image else "vessels"
        host = torch.from_numpy(pixels)
        if self.graphs is not None:
            outputs = self.graphs.run(host, mode)
        else:
            with torch.inference_mode():
                on_device = self._device_pass(host.to(self.device, non_blocking=True), mode)
                outputs = {name: value.cpu() for name, value in on_device.items()}
        counts = outputs.get("vessel_counts")
        return BatchOutput(
            images=_numpy(outputs["image"]) if "image" in outputs else None,
            vessels=_numpy(outputs["vessels"]) if need_vessels else None,
            uncertainty=_numpy(outputs["uncertainty"]) if "uncertainty" in outputs else None,
            uncertainty_means=_floats(outputs.get("uncertainty_mean")),
            fidelity=None if counts is None else fidelity_from_counts(counts.numpy()),
            quality_before=_floats(outputs.get("quality_before")),
            quality_after=_floats(outputs.get("quality_after")),
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

            def pick(values: Sequence[Any] | np.ndarray | None, at: int = index, keep: bool = enhance) -> Any:
                return values[at] if keep and values is not None else None

            fidelity = pick(output.fidelity)
            results.append(
                JobResult(
                    image=pick(output.images),
                    vessels=(
                        output.vessels[index]
                        if job.task is Task.SEGMENT and output.vessels is not None
                        else None
                    ),
                    queue_seconds=max(0.0, started - job.enqueued_at),
                    inference_seconds=seconds,
                    batch_size=len(jobs),
                    uncertainty=pick(output.uncertainty),
                    uncertainty_mean=pick(output.uncertainty_means),
                    fidelity=None if fidelity is None else fidelity.as_dict(),
                    quality_before=pick(output.quality_before),
                    quality_after=pick(output.quality_after),
                )
            )
        return results

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run zero batches through both outputs (allocator, cudnn autotune), or capture every CUDA
        graph; returns seconds taken."""
        clock = time.perf_counter()
        if self.graphs is not None:
            seconds = self.graphs.capture_all()
            log.info(
                "CUDA graphs captured", extra={"seconds": round(seconds, 2), "buckets": self.graphs.buckets}
            )
            return time.perf_counter() - clock
        size = self.working_size
        for count in batch_sizes:
            self.infer(np.zeros((count, 3, size, size), dtype=np.uint8), need_image=True, need_vessels=True)
        return time.perf_counter() - clock


class QualityWeightsError(ArtifactError):
    """``FUNDUS_QUALITY_WEIGHTS`` names no readable quality grader."""


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

    Raises :class:`DeviceSettingError` for a bad device, :class:`QualityWeightsError` for a bad
    quality grader and :class:`model.artifact.ArtifactError` for missing or corrupt weights. No warm-up.
    """
    try:
        device = select_device(settings.device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceSettingError(str(exc)) from exc
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    artifact = load_artifact(settings.weights, device)
    grader = None
    if settings.quality_weights:
        try:
            grader = load_quality(settings.quality_weights)
        except (OSError, ValueError, KeyError) as exc:
            raise QualityWeightsError(
                f"cannot load the quality grader {settings.quality_weights}: {exc}"
            ) from exc
    runner = ModelRunner(
        artifact.model,
        device,
        int(artifact.config.working_size),
        on_batch=on_batch,
        trust_signals=settings.trust_signals,
        cuda_graphs=settings.cuda_graphs,
        max_batch_size=settings.max_batch_size,
        grader=grader,
    )
    return runner, artifact
