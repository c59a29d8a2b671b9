"""CUDA graphs of the served model pass, one per (mode, batch-size bucket) at the fixed working size.

The lite and paper networks are many small-channel, full-resolution layers: on a large GPU the eager
forward spends much of its time launching kernels rather than running them. A CUDA graph records
the whole pass (:func:`model.inference.served_pass`) once per input shape and replays it with one
launch. The working size is fixed per artifact, so only the batch size varies: batches are padded
up to the next bucket (powers of two up to the largest batch the queue forms), and a batch larger
than the largest bucket runs as several replays.

Host↔device traffic is uint8 through page-locked buffers, so copies are asynchronous DMA.

All graphs share one memory pool. That is safe here because a replay's outputs are copied to the
host before the next replay starts (a later replay may reuse the memory of an earlier one's
outputs, never of its inputs, which live outside the pool); :class:`GraphedPasses` is therefore not
for concurrent use, which the runner guarantees (one model thread per device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.inference import MODES, Mode

log = logging.getLogger("fundus.cuda_graphs")

PassFn = Callable[[torch.Tensor, Mode], dict[str, torch.Tensor]]
#: Eager passes run before capturing a graph (cuDNN algorithm choice, allocator warm-up).
WARMUP_PASSES = 2


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: 12 → (1, 2, 4, 8, 12)."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``count`` images (``count`` ≤ the largest bucket)."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"batch of {count} is larger than the largest bucket {buckets[-1]}")


def chunks(count: int, largest: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``largest`` images covering ``count``."""
    return [(start, min(start + largest, count)) for start in range(0, count, largest)]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor  # uint8 (bucket, 3, S, S) on the device, outside the pool
    static_output: dict[str, torch.Tensor]
    pinned_input: torch.Tensor  # uint8 (bucket, 3, S, S), page-locked host memory
    pinned_output: dict[str, torch.Tensor]


class GraphedPasses:
    """Captured graphs of ``run_pass`` for every mode and bucket.

    Args:
        run_pass: ``(uint8 (B, 3, S, S) device tensor, mode) → dict of device tensors`` with a
            leading batch dimension (the served pass with its model, trust and layout bound).
        device: a CUDA device.
        working_size: S.
        buckets: batch sizes to capture (see :func:`batch_buckets`).
        modes: which modes to capture.
    """

    def __init__(
        self,
        run_pass: PassFn,
        device: torch.device,
        working_size: int,
        buckets: Sequence[int],
        modes: Sequence[Mode] = MODES,
    ) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.run_pass = run_pass
        self.device = device
        self.working_size = working_size
        self.buckets = tuple(sorted(buckets))
        self.modes = tuple(modes)
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[Mode, int], _Graph] = {}

    def capture_all(self) -> float:
        """Capture every (mode, bucket), the largest first so the pool is sized once; seconds taken."""
        clock = time.perf_counter()
        for mode in self.modes:
            for bucket in reversed(self.buckets):
                self._capture(mode, bucket)
        return time.perf_counter() - clock

    @torch.inference_mode()
    def _capture(self, mode: Mode, bucket: int) -> _Graph:
        key = (mode, bucket)
        if key in self._graphs:
            return self._graphs[key]
        size = self.working_size
        static_input = torch.zeros((bucket, 3, size, size), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                self.run_pass(static_input, mode)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self.run_pass(static_input, mode)
        entry = _Graph(
            graph=graph,
            static_input=static_input,
            static_output=static_output,
            pinned_input=torch.empty(static_input.shape, dtype=torch.uint8).pin_memory(),
            pinned_output={
                name: torch.empty(value.shape, dtype=value.dtype).pin_memory()
                for name, value in static_output.items()
            },
        )
        self._graphs[key] = entry
        log.debug("captured a CUDA graph", extra={"mode": mode, "batch_size": bucket})
        return entry

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor, mode: Mode) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, S, S) host pixels → the pass's outputs as host tensors (B first), by replay."""
        parts = [
            self._run_bucketed(pixels[start:stop], mode)
            for start, stop in chunks(len(pixels), self.buckets[-1])
        ]
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def _run_bucketed(self, pixels: torch.Tensor, mode: Mode) -> dict[str, torch.Tensor]:
        count = len(pixels)
        entry = self._capture(mode, bucket_for(count, self.buckets))
        entry.pinned_input[:count].copy_(pixels)
        if count < len(entry.pinned_input):
            entry.pinned_input[count:].zero_()
        entry.static_input.copy_(entry.pinned_input, non_blocking=True)
        entry.graph.replay()
        for name, value in entry.static_output.items():
            entry.pinned_output[name][:count].copy_(value[:count], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        # Copies: the pinned buffers are reused by the next replay of this bucket.
        return {name: value[:count].clone() for name, value in entry.pinned_output.items()}
