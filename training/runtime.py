"""Process-level plumbing of a training run: distributed setup, device, logs, hardware summary.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised with NCCL on CUDA and
Gloo on CPU; each rank uses ``cuda:LOCAL_RANK``. Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.device import select_device

log = logging.getLogger("training")


@dataclass
class DistEnv:
    """Rank information of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str) -> tuple[DistEnv, torch.device]:
    """Read the torchrun environment, initialise the process group, pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = training_device(device_preference, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return env, device


def training_device(preference: str, env: DistEnv) -> torch.device:
    """The device this rank trains on, always with an index on CUDA.

    ``auto`` and ``cuda`` resolve to ``cuda:LOCAL_RANK`` (``cuda:0`` in a single process), because
    ``torch.cuda.set_device`` and DDP's ``device_ids`` need an index; an explicit ``cuda:N`` is kept
    in a single process and replaced by the local rank's GPU under torchrun.
    """
    device = select_device(preference)
    if device.type != "cuda":
        return device
    if env.distributed or device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (so every rank stops at the same step)."""
    if not env.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def hardware_summary(device: torch.device, env: DistEnv) -> dict[str, Any]:
    """Device, CPU and library description for the training summary."""
    info: dict[str, Any] = {
        "device": str(device),
        "world_size": env.world_size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class RunLogger:
    """Scalar log: a CSV file always, TensorBoard event files when available; rank 0 only.

    The CSV has a fixed header (``step``, ``time_s`` then ``columns``); cells of keys not logged at
    a step stay empty. On resume, rows after the checkpoint step are dropped so the file matches
    the restored state exactly.

    Args:
        folder: run folder; writes ``log.csv`` and ``tb/``.
        columns: scalar names.
        enabled: False on ranks other than 0.
        tensorboard: try to open a TensorBoard writer.
        resume_step: keep only rows with step ≤ this (None = start a new file).
    """

    def __init__(
        self,
        folder: Path,
        columns: list[str],
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.columns = ["step", "time_s", *columns]
        self.path = folder / "log.csv"
        self._tb: Any = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            if rows and rows[0][:1] == ["step"]:
                # Rows are re-keyed by name: a resumed run may log more (or fewer) scalars than before.
                old = rows[0]
                for row in rows[1:]:
                    if row and int(row[0]) <= resume_step:
                        cells = dict(zip(old, row, strict=False))
                        kept.append([cells.get(c, "") for c in self.columns])
        with self.path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            writer.writerows(kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(folder / "tb"), purge_step=resume_step)
            except ImportError:
                log.info("tensorboard not installed: CSV log only")

    def log(self, step: int, time_s: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"scalars not declared in the log header: {sorted(unknown)}")
        row = [str(step), f"{time_s:.1f}"] + [
            f"{values[c]:.6g}" if c in values else "" for c in self.columns[2:]
        ]
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(row)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
