"""Phase 1: pretrain the vessel (RSP) branch on manually annotated images (AG-Net recipe).

Loss: 2-class cross-entropy on the four side outputs (+ their average, as AG-Net), equal weights.
Validation: AUC / accuracy / IoU of the full-resolution side output on the validation images
that have manual masks. Product: ``<run>/rsp/rsp.safetensors``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from model.device import autocast, conv_memory_format
from model.presets import get_preset
from model.vessels import VesselNet
from training.checkpoint import StatefulParts
from training.config import TrainConfig
from training.datasets import WorkingDataset, to_float
from training.loop import optimizer_step
from training.losses import multiscale_segmentation
from training.metrics import vessel_metrics
from training.prepare import WorkingCache
from training.runtime import hardware_summary, shutdown_distributed
from training.schedules import lr_factor
from training.session import Session, make_batches, open_session, prepare_cache, run_session_loop
from training.vessel_weights import save_vessels

log = logging.getLogger("training")
PHASE = "rsp"
COLUMNS = ["lr", "loss/vessel", "loss/total", "grad_norm", "val/auc", "val/acc", "val/iou"]


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 autocast (bf16 and CPU need none)."""
    fp16 = device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)


class RspTask(StatefulParts):
    """Vessel-branch pretraining state and step."""

    def __init__(self, session: Session) -> None:
        cfg = session.config
        self.session = session
        self.device = session.device
        self.amp = cfg.run.amp
        self.vessel_config = get_preset(cfg.model.preset).vessels
        torch.manual_seed(cfg.run.seed)
        self.net = VesselNet(self.vessel_config).to(
            self.device, memory_format=conv_memory_format(self.device)
        )
        self.model: torch.nn.Module = (
            DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if session.env.distributed
            else self.net
        )
        optim = cfg.rsp.optim
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.rsp.steps, optim.warmup_steps, optim.lr, optim.lr_min)
        )
        self.scaler = make_scaler(self.device, self.amp)
        self.generators: dict[str, torch.Generator] = {}
        self.cache = WorkingCache(cfg.data.cache_dir, cfg.data.working_size)
        self.records = session.split.with_role("vessel")
        if not self.records:
            raise ValueError("no training images with manual vessel masks (check data.vessel_sets)")
        self.val_records = [r for r in session.split.with_role("val") if r.vessel is not None][
            : max(cfg.data.val_images, 1)
        ]
        prepare_cache(self.records + self.val_records, self.cache, session)
        self.dataset = WorkingDataset(self.records, self.cache, cfg.data.crop_size)

    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.net.train()
        data = to_float(batch, self.device)
        with autocast(self.device, self.amp):
            logits = self.model(data["image"]).logits
        loss = multiscale_segmentation(
            logits, data["vessel"], include_avg=self.session.config.rsp.include_avg
        )
        lr = self.optimizer.param_groups[0]["lr"]
        norm = optimizer_step(
            loss, self.optimizer, self.scaler, self.net, self.session.config.rsp.optim.grad_clip
        )
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
            prob = self.net.predict(image)[0, 0].cpu()
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


def train_rsp(
    config: TrainConfig,
    *,
    resume: str | None = None,
    max_minutes: float = 0.0,
    stop_at: int = 0,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) phase 1; returns a summary with the output path when finished."""
    session = open_session(config, PHASE, resume=resume, run_dir=run_dir)
    try:
        task = RspTask(session)
        result = run_session_loop(
            session,
            task,
            lambda s: make_batches(
                task.dataset, config.rsp.batch_size, config.run.seed, config.rsp.steps, s, session
            ),
            COLUMNS,
            total_steps=config.rsp.steps,
            max_minutes=max_minutes,
            stop_at=stop_at,
            extra_state=lambda: {"phase": PHASE, "config": config.to_dict()},
        )
        summary: dict[str, Any] = {
            "phase": PHASE,
            "steps": result.step,
            "finished": result.finished,
            "wall_time_s": round(result.elapsed_s, 1),
            "validation": result.last_val,
            "run_dir": str(session.run_dir),
        }
        if result.finished and session.env.is_main:
            out = session.run_dir / "rsp.safetensors"
            training = {
                **summary,
                "hardware": hardware_summary(session.device, session.env),
                "data_roles": session.split.counts(),
            }
            save_vessels(out, task.net, task.vessel_config, config.model.preset, training)
            summary["weights"] = str(out)
        return summary
    finally:
        shutdown_distributed()
