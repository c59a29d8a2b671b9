"""Set-up shared by the training phases: run folder, resolved config, split, logs, resume.

Layout of a phase folder ``runs/<name>/<phase>/``: ``config.yaml`` (resolved), ``roles.csv`` and
``split.json`` (every image's role), ``log.csv`` and ``tb/`` (curves), ``checkpoint.pt``, and the
phase's product (``rsp.safetensors``, ``teacher.safetensors``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model.device import reuse_freed_memory
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from training.config import TrainConfig, dump_config
from training.datasets import StepBatchSampler
from training.loop import LoopOptions, LoopResult, TrainTask, resume_state, run_loop
from training.runtime import DistEnv, RunLogger, barrier, init_distributed
from training.sources import Split, build_split

log = logging.getLogger("training")


@dataclass
class Session:
    """Everything a phase needs that does not depend on the phase."""

    config: TrainConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    split: Split
    resume: dict[str, Any] | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def open_session(
    config: TrainConfig, phase: str, *, resume: str | None = None, run_dir: str | None = None
) -> Session:
    """Resolve the phase folder, init the process group, write config and split (rank 0).

    Without ``resume`` an existing folder is started afresh (its old checkpoint and logs are
    removed); with ``resume`` the folder's checkpoint is loaded.
    """
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    env, device = init_distributed(config.run.device)
    if device.type == "cpu":
        reuse_freed_memory()  # activations reuse the heap instead of page-faulting in every step
    folder = Path(resume) if resume else Path(run_dir) if run_dir else config.phase_dir(phase)
    payload = None
    if resume:
        payload = load_checkpoint(folder / CHECKPOINT_NAME)
        if payload.get("phase") != phase:
            raise ValueError(f"{folder} holds a {payload.get('phase')!r} checkpoint, not {phase!r}")
        changed = _changed_keys(payload.get("config", {}), config.to_dict())
        if changed and env.is_main:
            log.warning(
                "resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed)
            )
    elif env.is_main and folder.exists():
        for stale in (CHECKPOINT_NAME, "log.csv", "tb"):
            target = folder / stale
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    seed_everything(config.run.seed)
    split = build_split(config.data)
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        dump_config(config, folder / "config.yaml")
        split.write(folder)
    barrier(env)
    return Session(config, env, device, folder, split, payload)


def _changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def make_batches(
    dataset: Dataset, batch_size: int, seed: int, total_steps: int, start_step: int, session: Session
) -> DataLoader:
    """A DataLoader over the stateless step sampler of this rank."""
    sampler = StepBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        seed,
        total_steps,
        start_step,
        rank=session.env.rank,
        world_size=session.env.world_size,
    )
    workers = session.config.run.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=session.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


#: Threads that fill the working-size cache (decode, FOV, resize and PNG writes release the GIL).
CACHE_THREADS = 8


def prepare_cache(records: list[Any], cache: Any, session: Session) -> None:
    """Fill the working-size cache on rank 0 before the other ranks read it.

    Photographs are prepared on a few threads: about 65 ms each on one core, which for the ~670
    photographs of the GPU recipe would otherwise be a noticeable part of a minutes-long run.
    """
    if session.env.is_main:
        unique = list({record.key: record for record in records}.values())
        workers = max(1, min(CACHE_THREADS, os.cpu_count() or 1, len(unique)))
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(cache.ensure, unique):
                pass  # re-raises the first failure
    barrier(session.env)


def run_session_loop(
    session: Session,
    task: TrainTask,
    batches: Callable[[int], Iterable[Any]],
    columns: list[str],
    *,
    total_steps: int,
    max_minutes: float,
    stop_at: int,
    extra_state: Callable[[], dict[str, Any]],
) -> LoopResult:
    """Resume ``task`` if the session holds a checkpoint, then run the loop with the run's logger.

    The part every phase shares: restore state, open the CSV/TensorBoard log at the resumed step,
    build the loop options from ``config.logging`` and the phase's step budget, run, close the log.
    """
    config = session.config
    start, elapsed = resume_state(task, session.resume, session.env) if session.resume else (0, 0.0)
    logger = RunLogger(
        session.run_dir,
        columns,
        enabled=session.env.is_main,
        tensorboard=config.logging.tensorboard,
        resume_step=start if session.resume else None,
    )
    options = LoopOptions(
        total_steps=total_steps,
        log_every=config.logging.log_every,
        val_every=config.logging.val_every,
        checkpoint_every=config.logging.checkpoint_every,
        max_minutes=max_minutes,
        stop_at=stop_at,
        progress=config.logging.progress,
    )
    try:
        return run_loop(
            task,
            batches,
            run_dir=session.run_dir,
            env=session.env,
            device=session.device,
            logger=logger,
            options=options,
            start_step=start,
            elapsed_before=elapsed,
            extra_state=extra_state,
        )
    finally:
        logger.close()
