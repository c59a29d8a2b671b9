"""The iteration loop shared by the training phases.

Reads top to bottom: for each step take the batch, run the task's ``train_step`` (forward,
backward, clipped optimiser step, scheduler, EMA), log every ``log_every`` steps, validate every
``val_every``, checkpoint every ``checkpoint_every`` and when the time budget or a stop step is
reached. A checkpoint saved at step N resumes into exactly the run that would have continued.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from training.checkpoint import CHECKPOINT_NAME, capture_rng, restore_rng, save_checkpoint
from training.runtime import DistEnv, RunLogger, any_rank, barrier

log = logging.getLogger("training")


class TrainTask(Protocol):
    """What a phase provides to :func:`run_loop`."""

    generators: dict[str, torch.Generator]

    def train_step(self, step: int, batch: Any) -> dict[str, float]: ...

    def validate(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopOptions:
    """Step counts and limits of one invocation.

    Attributes:
        total_steps: steps of the whole run (the schedule length).
        log_every, val_every, checkpoint_every: intervals (0 disables the periodic action).
        max_minutes: wall-clock budget of this invocation (0 = none); on expiry checkpoint and stop.
        stop_at: stop (with a checkpoint) once this step is reached (0 = run to ``total_steps``).
        progress: tqdm bar on rank 0.
    """

    total_steps: int
    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 200
    max_minutes: float = 0.0
    stop_at: int = 0
    progress: bool = True


@dataclass
class LoopResult:
    step: int
    finished: bool
    elapsed_s: float
    last_val: dict[str, float]


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    module: nn.Module,
    grad_clip: float,
) -> float:
    """Backward on the (scaled) loss, unscale, clip, step; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for p in module.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = (
            torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
            if params
            else torch.zeros(())
        )
    scaler.step(optimizer)
    scaler.update()
    return float(norm)


def run_loop(
    task: TrainTask,
    batches: Callable[[int], Iterable[Any]],
    *,
    run_dir: Path,
    env: DistEnv,
    device: torch.device,
    logger: RunLogger,
    options: LoopOptions,
    start_step: int = 0,
    elapsed_before: float = 0.0,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> LoopResult:
    """Train from ``start_step`` to ``options.total_steps`` (or until a stop condition).

    Args:
        task: the phase.
        batches: ``batches(start_step)`` yields one batch per step from ``start_step`` on.
        run_dir: the phase folder (checkpoint path).
        env, device: process placement.
        logger: scalar log.
        options: intervals and limits.
        start_step: first step (0, or the resumed step).
        elapsed_before: wall seconds of earlier invocations (the summary reports the total).
        extra_state: more entries for the checkpoint (e.g. the resolved config).
    """
    started = time.monotonic()
    step = start_step
    last_val: dict[str, float] = {}

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def checkpoint() -> None:
        # Every rank has its own degradation/noise streams: gather them all into the checkpoint.
        rng = capture_rng(task.generators)
        rng_ranks: list[Any] = [rng]
        if env.distributed:
            rng_ranks = [None] * env.world_size
            dist.all_gather_object(rng_ranks, rng)
        if env.is_main:
            payload = {
                "step": step,
                # The data stream is a pure function of the step (see training.datasets).
                "data_position": step,
                "elapsed_s": elapsed(),
                "task": task.state_dict(),
                "rng": rng,
                "rng_ranks": rng_ranks,
                **(extra_state() if extra_state else {}),
            }
            save_checkpoint(run_dir / CHECKPOINT_NAME, payload)
        barrier(env)

    bar: Any = None
    if env.is_main and options.progress:
        from tqdm import tqdm

        bar = tqdm(total=options.total_steps, initial=start_step, dynamic_ncols=True, desc=run_dir.name)
    finished = start_step >= options.total_steps
    stopped = False
    # SIGTERM (preemption, `kill`) ends the run at the next step boundary with a checkpoint.
    terminated = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    for batch in batches(start_step):
        if step >= options.total_steps:
            break
        values = task.train_step(step, batch)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values.get('loss/total', 0.0):.4f}")
        last = step >= options.total_steps
        if options.log_every and (step % options.log_every == 0 or step == 1 or last):
            logger.log(step, elapsed(), values)
        if options.val_every and step % options.val_every == 0 and step < options.total_steps:
            last_val = task.validate(step)
            if last_val:
                logger.log(step, elapsed(), last_val)
        finished = step >= options.total_steps
        over_time = options.max_minutes > 0 and (time.monotonic() - started) >= options.max_minutes * 60
        stop_here = options.stop_at > 0 and step >= options.stop_at
        stopped = any_rank(over_time or stop_here or terminated.is_set(), env, device) and not finished
        if finished or stopped:
            break
        if options.checkpoint_every and step % options.checkpoint_every == 0:
            checkpoint()
    if finished:
        last_val = task.validate(step) or last_val
        if last_val:
            logger.log(step, elapsed(), last_val)
    checkpoint()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    if bar is not None:
        bar.close()
    if stopped:
        log.info("stopped at step %d of %d; continue with --resume %s", step, options.total_steps, run_dir)
    return LoopResult(step=step, finished=finished, elapsed_s=elapsed(), last_val=last_val)


def resume_state(task: TrainTask, payload: dict[str, Any], env: DistEnv) -> tuple[int, float]:
    """Load a checkpoint payload into ``task`` and this rank's RNGs; returns (step, elapsed seconds).

    Resuming with another world size gives every rank the saved streams of rank ``rank % saved``
    (training continues, but is no longer bit-identical to an uninterrupted run).
    """
    task.load_state_dict(payload["task"])
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) != env.world_size:
        log.warning("checkpoint saved by %d process(es), resuming with %d", len(ranks), env.world_size)
    restore_rng(ranks[env.rank % len(ranks)], task.generators)
    return int(payload["step"]), float(payload.get("elapsed_s", 0.0))
