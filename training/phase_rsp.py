"""Phase 1: pretrain the vessel (RSP) branch on manually annotated images (AG-Net recipe).

Loss: 2-class cross-entropy on the four side outputs (+ their average, as AG-Net), equal weights.
With ``rsp.degrade_prob`` > 0 a share of the inputs is Cofe-degraded first (the mask stays the
clean one), so the branch segments through the degradations it guides the restorer on in phase 2.
Validation: AUC / accuracy / IoU of the full-resolution side output on the validation images
that have manual masks. Product: ``<run>/rsp/rsp.safetensors``.

:class:`VesselTask` is the supervised segmentation step shared with the independent evaluation
segmenter (:mod:`training.phase_segmenter`), which differs only in network, loss and images.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.device import autocast, conv_memory_format
from model.presets import get_preset
from model.vessels import VesselNet
from training.checkpoint import StatefulParts
from training.config import OptimConfig, TrainConfig
from training.datasets import WorkingDataset, crop_batch, derive_seed, to_float
from training.loop import optimizer_step
from training.losses import multiscale_segmentation
from training.metrics import vessel_metrics
from training.prepare import WorkingCache
from training.runtime import hardware_summary, shutdown_distributed
from training.schedules import lr_factor
from training.session import Session, make_batches, open_session, prepare_cache, run_session_loop
from training.sources import ImageRecord
from training.synthetic import degrade_some
from training.vessel_weights import save_vessels

log = logging.getLogger("training")
PHASE = "rsp"
COLUMNS = ["lr", "loss/vessel", "loss/total", "grad_norm", "val/auc", "val/acc", "val/iou"]

#: (network output, {0,1} mask (B, 1, h, w)) → scalar loss.
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
#: (network, (B, 3, H, W) images) → (B, 1, H, W) vessel probability.
ProbabilityFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 autocast (bf16 and CPU need none)."""
    fp16 = device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)


class VesselTask(StatefulParts):
    """Supervised vessel segmentation: state, step and validation.

    Args:
        session: the phase's session.
        net: the network (moved to the device and its memory layout here).
        records: training images with manual masks.
        steps: schedule length.
        optim: optimiser and schedule settings.
        loss_fn: loss of a batch.
        probability: vessel probability for validation.
        degrade_prob: share of inputs degraded first (0 = clean only).
        degradation_mode: Cofe ``cofe`` or ``paper``.
    """

    def __init__(
        self,
        session: Session,
        net: nn.Module,
        records: list[ImageRecord],
        *,
        steps: int,
        optim: OptimConfig,
        loss_fn: LossFn,
        probability: ProbabilityFn,
        degrade_prob: float = 0.0,
        degradation_mode: str = "cofe",
    ) -> None:
        cfg = session.config
        self.session = session
        self.device = session.device
        self.amp = cfg.run.amp
        self.net = net.to(self.device, memory_format=conv_memory_format(self.device))
        self.model: nn.Module = (
            DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if session.env.distributed
            else self.net
        )
        self.grad_clip = optim.grad_clip
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, optim.warmup_steps, optim.lr, optim.lr_min)
        )
        self.scaler = make_scaler(self.device, self.amp)
        self.loss_fn = loss_fn
        self.probability = probability
        self.generators: dict[str, torch.Generator] = {}
        self.cache = WorkingCache(cfg.data.cache_dir, cfg.data.working_size)
        self.records = records
        if not self.records:
            raise ValueError("no training images with manual vessel masks (check data.vessel_sets)")
        self.val_records = [r for r in session.split.with_role("val") if r.vessel is not None][
            : max(cfg.data.val_images, 1)
        ]
        prepare_cache(self.records + self.val_records, self.cache, session)
        # With degradation the whole working image is degraded first (the Cofe-Net constants are
        # meant for it), then cropped; without, the dataset crops.
        self.degrade_prob = degrade_prob
        self.degradation_mode = degradation_mode
        self.dataset = WorkingDataset(
            self.records, self.cache, cfg.data.crop_size, crop_here=self.degrade_prob == 0
        )
        if self.degrade_prob > 0:
            self.generators["degrade"] = torch.Generator().manual_seed(
                derive_seed(cfg.run.seed, "rsp-degrade", session.env.rank)
            )

    def _inputs(self, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, vessel mask) of a batch, degraded and cropped as configured."""
        if self.degrade_prob == 0:
            return data["image"], data["vessel"]
        image = degrade_some(
            data["image"],
            data["fov"],
            self.generators["degrade"],
            keep_prob=1.0 - self.degrade_prob,
            mode=self.degradation_mode,
        )
        corners, size = data["corner"], self.session.config.data.crop_size
        return crop_batch(image, corners, size), crop_batch(data["vessel"], corners, size)

    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.net.train()
        image, vessel = self._inputs(to_float(batch, self.device))
        with autocast(self.device, self.amp):
            output = self.model(image)
        loss = self.loss_fn(output, vessel)
        lr = self.optimizer.param_groups[0]["lr"]
        norm = optimizer_step(loss, self.optimizer, self.scaler, self.net, self.grad_clip)
        self.scheduler.step()
        value = float(loss.detach())
        return {"lr": lr, "loss/vessel": value, "loss/total": value, "grad_norm": norm}

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        if not self.session.env.is_main or not self.val_records:
            return {}
        was_training = self.net.training
        self.net.eval()
        scores: dict[str, list[float]] = {"auc": [], "acc": [], "iou": []}
        for record in self.val_records:
            sample = self.cache.load(record)
            image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float().div(255).to(self.device)
            prob = self.probability(self.net, image)[0, 0].cpu()
            assert sample.vessel is not None
            result = vessel_metrics(prob, torch.from_numpy(sample.vessel), torch.from_numpy(sample.fov))
            for key in scores:
                scores[key].append(result[key])
        self.net.train(was_training)
        return {f"val/{k}": sum(v) / len(v) for k, v in scores.items()}

    def stateful_parts(self) -> dict[str, Any]:
        return {
            "model": self.net,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }


def make_rsp_task(session: Session) -> VesselTask:
    """Phase 1's task: the preset's vessel branch on every manually annotated training image."""
    cfg = session.config
    torch.manual_seed(cfg.run.seed)
    return VesselTask(
        session,
        VesselNet(get_preset(cfg.model.preset).vessels),
        session.split.with_role("vessel"),
        steps=cfg.rsp.steps,
        optim=cfg.rsp.optim,
        loss_fn=lambda output, mask: multiscale_segmentation(output.logits, mask, cfg.rsp.include_avg),
        probability=lambda net, image: net.predict(image),
        degrade_prob=cfg.rsp.degrade_prob,
        degradation_mode=cfg.rsp.degradation_mode,
    )


def run_vessel_phase(
    config: TrainConfig,
    phase: str,
    make_task: Callable[[Session], VesselTask],
    *,
    steps: int,
    batch_size: int,
    save: Callable[[VesselTask, Session, dict[str, Any]], str],
    resume: str | None,
    max_minutes: float,
    stop_at: int,
    run_dir: str | None,
) -> dict[str, Any]:
    """Run (or continue) a :class:`VesselTask` phase; ``save`` writes the product when finished."""
    session = open_session(config, phase, resume=resume, run_dir=run_dir)
    try:
        task = make_task(session)
        result = run_session_loop(
            session,
            task,
            lambda s: make_batches(task.dataset, batch_size, config.run.seed, steps, s, session),
            COLUMNS,
            total_steps=steps,
            max_minutes=max_minutes,
            stop_at=stop_at,
            extra_state=lambda: {"phase": phase, "config": config.to_dict()},
        )
        summary: dict[str, Any] = {
            "phase": phase,
            "steps": result.step,
            "finished": result.finished,
            "wall_time_s": round(result.elapsed_s, 1),
            "validation": result.last_val,
            "trained_on": dict(sorted(Counter(r.set for r in task.records).items())),
            "run_dir": str(session.run_dir),
        }
        if result.finished and session.env.is_main:
            training = {
                **summary,
                "hardware": hardware_summary(session.device, session.env),
                "data_roles": session.split.counts(),
            }
            summary["weights"] = save(task, session, training)
        return summary
    finally:
        shutdown_distributed()


def train_rsp(
    config: TrainConfig,
    *,
    resume: str | None = None,
    max_minutes: float = 0.0,
    stop_at: int = 0,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) phase 1; returns a summary with the output path when finished."""

    def save(task: VesselTask, session: Session, training: dict[str, Any]) -> str:
        out = session.run_dir / "rsp.safetensors"
        vessels = get_preset(config.model.preset).vessels
        assert isinstance(task.net, VesselNet)
        save_vessels(out, task.net, vessels, config.model.preset, training)
        return str(out)

    return run_vessel_phase(
        config,
        PHASE,
        make_rsp_task,
        steps=config.rsp.steps,
        batch_size=config.rsp.batch_size,
        save=save,
        resume=resume,
        max_minutes=max_minutes,
        stop_at=stop_at,
        run_dir=run_dir,
    )
