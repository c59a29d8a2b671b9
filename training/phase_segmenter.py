"""The independent evaluation segmenter (:mod:`training.segmenter`), trained on clean photographs only.

Images: the manually annotated training images of the *clean* sets (``data.clean_sets`` ∩
``data.vessel_sets``: HRF and FIVES in the shipped configs), never degraded, never enhanced, never
a real low-quality photograph such as CHASE_DB1. Product: ``<run>/segmenter/segmenter.safetensors``,
used by ``fundus eval`` and phase-2 validation.
"""

from __future__ import annotations

from typing import Any

import torch

from training.config import TrainConfig
from training.phase_rsp import VesselTask, run_vessel_phase
from training.segmenter import SegmenterNet, save_segmenter, segmenter_loss
from training.session import Session

PHASE = "segmenter"


def make_segmenter_task(session: Session) -> VesselTask:
    cfg = session.config
    clean_sets = set(cfg.data.clean_sets)
    records = [r for r in session.split.with_role("vessel") if r.set in clean_sets]
    torch.manual_seed(cfg.run.seed)
    return VesselTask(
        session,
        SegmenterNet(cfg.segmenter.width),
        records,
        steps=cfg.segmenter.steps,
        optim=cfg.segmenter.optim,
        loss_fn=segmenter_loss,
        probability=lambda net, image: net.predict(image),
    )


def train_segmenter(
    config: TrainConfig,
    *,
    resume: str | None = None,
    max_minutes: float = 0.0,
    stop_at: int = 0,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the segmenter training; returns a summary with the weights path."""

    def save(task: VesselTask, session: Session, training: dict[str, Any]) -> str:
        out = session.run_dir / "segmenter.safetensors"
        assert isinstance(task.net, SegmenterNet)
        save_segmenter(out, task.net, training)
        return str(out)

    return run_vessel_phase(
        config,
        PHASE,
        make_segmenter_task,
        steps=config.segmenter.steps,
        batch_size=config.segmenter.batch_size,
        save=save,
        resume=resume,
        max_minutes=max_minutes,
        stop_at=stop_at,
        run_dir=run_dir,
    )
