"""Phase 2: T-MAGE-Net, the MAGE-Net student trained with an EMA mean teacher.

Per step (MODEL_SPEC §1.4–1.5):
  1. clean working images → batched Cofe-Net degradation on the device, with a seeded generator
     that is part of the checkpoint; then a joint crop of clean, degraded, vessel mask and FOV;
  2. one student forward on [degraded ; unlabeled real] (GroupNorm only: samples do not interact);
  3. L = Σ_k [Char + w_e·Edge](I_k, clean) + λ·Σ_s CE(seg_s, mask)
         + w(t)·[Σ_k MSE(S_k, T_k) + Σ_s MSE(softmax S_s, softmax T_s)],
     the teacher seeing the unlabeled image + Gaussian noise inside the FOV;
  4. clipped Adam step, cosine LR, EMA teacher update with warm-up.

Ablations (the paper's Table 6): ``loss.stages: [1]`` (S1), ``[1, 2]`` with ``use_rsp: false`` (S1+S2),
``use_rsp: true`` (+RSP), ``consistency_weight > 0`` (+mean teacher); ``consistency_weight: 0`` is
MAGE-Net without the teacher-student term.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from model.artifact import save_artifact
from model.degradation import degrade
from model.device import autocast, conv_memory_format
from model.magenet import MageNet
from model.presets import get_preset
from training.checkpoint import StatefulParts
from training.config import TrainConfig
from training.datasets import WorkingDataset, crop_batch, derive_seed, to_float
from training.ema import effective_decay, ema_update, make_teacher
from training.evaluate import degrade_fixed
from training.loop import optimizer_step
from training.losses import RestorationLoss, consistency_mse, multiscale_segmentation
from training.metrics import psnr, ssim
from training.phase_pseudo import pseudo_dir_path, rsp_weights_path
from training.phase_rsp import make_scaler
from training.prepare import WorkingCache, pseudo_mask_path
from training.runtime import hardware_summary, shutdown_distributed
from training.schedules import consistency_weight, lr_factor
from training.session import Session, make_batches, open_session, prepare_cache, run_session_loop
from training.vessel_weights import load_vessels

log = logging.getLogger("training")
PHASE = "enhance"
COLUMNS = [
    "lr",
    "loss/char",
    "loss/edge",
    "loss/vessel",
    "loss/consistency",
    "loss/total",
    "weight/consistency",
    "ema_decay",
    "grad_norm",
    "val/psnr",
    "val/ssim",
    "val/psnr_input",
    "val/ssim_input",
]
VAL_SEED = 20_000


def rampup_length(config: TrainConfig) -> int:
    steps = config.enhance.loss.rampup_steps
    return int(0.2 * config.enhance.steps) if steps < 0 else steps


class EnhanceTask(StatefulParts):
    """Student, teacher, optimiser and the per-step computation of phase 2."""

    def __init__(self, session: Session) -> None:
        cfg = session.config
        e, loss = cfg.enhance, cfg.enhance.loss
        self.session = session
        self.config = cfg
        self.device = session.device
        self.amp = cfg.run.amp
        preset = get_preset(cfg.model.preset)
        torch.manual_seed(cfg.run.seed)
        self.student = MageNet(preset)
        self.rsp_info: dict[str, Any] = {}
        if loss.use_rsp:
            path = rsp_weights_path(cfg, e.rsp_checkpoint)
            self.rsp_info = {"weights": str(path), **load_vessels(path, self.student.vessels, preset.vessels)}
        self.student.to(self.device, memory_format=conv_memory_format(self.device))
        self.teacher = make_teacher(self.student)
        self.model: torch.nn.Module = self.student
        if session.env.distributed:
            self.model = DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=sorted(set(loss.stages)) != [1, 2],
            )
        o = e.optim
        self.optimizer = torch.optim.Adam(
            self.student.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, e.steps, o.warmup_steps, o.lr, o.lr_min)
        )
        self.scaler = make_scaler(self.device, self.amp)
        self.restoration = RestorationLoss(loss.charbonnier_eps, loss.edge_weight, loss.stages).to(
            self.device
        )
        rank = session.env.rank
        noise = torch.Generator(device=self.device)
        noise.manual_seed(derive_seed(cfg.run.seed, "noise", rank))
        self.generators = {
            "degrade": torch.Generator().manual_seed(derive_seed(cfg.run.seed, "degrade", rank)),
            "noise": noise,
        }
        self.rampup = rampup_length(cfg)
        self.use_teacher = loss.consistency_weight > 0 and e.batch_unlabeled > 0
        self.cache = WorkingCache(cfg.data.cache_dir, cfg.data.working_size)
        split = session.split
        self.labeled = split.with_role("clean")
        self.unlabeled = split.with_role("unlabeled") if self.use_teacher else []
        if not self.labeled:
            raise ValueError("no clean training images (check data.clean_sets / data.eyeq_*)")
        if self.use_teacher and not self.unlabeled:
            raise ValueError("consistency_weight > 0 needs unlabeled real images (data.unlabeled_sets ...)")
        clean_sets = set(cfg.data.clean_sets) | {"eyeq"}
        self.val_records = [r for r in split.with_role("val") if r.set in clean_sets][: cfg.data.val_images]
        prepare_cache(self.labeled + self.unlabeled + self.val_records, self.cache, session)
        pseudo = pseudo_dir_path(cfg, e.pseudo_dir)
        self.labeled_set = WorkingDataset(
            self.labeled,
            self.cache,
            cfg.data.crop_size,
            crop_here=not e.degrade_full,
            pseudo_dir=pseudo,
            with_vessels=loss.use_rsp,
        )
        self.unlabeled_set = WorkingDataset(
            self.unlabeled, self.cache, cfg.data.crop_size, with_vessels=False
        )
        if loss.use_rsp and session.env.is_main:
            needs_mask = [r for r in self.labeled if "pseudo" in r.roles]
            missing = [r.key for r in needs_mask if not pseudo_mask_path(pseudo, r).is_file()]
            if missing:
                log.warning(
                    "%d clean images have no pseudo-mask in %s (run `fundus train pseudo-masks`)",
                    len(missing),
                    pseudo,
                )
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # ---------------------------------------------------------------- data
    def batches(
        self, start_step: int
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
        e, seed, session = self.config.enhance, self.config.run.seed, self.session
        labeled = make_batches(self.labeled_set, e.batch_labeled, seed, e.steps, start_step, session)
        if not self.use_teacher:
            for batch in labeled:
                yield batch, None
            return
        unlabeled = make_batches(
            self.unlabeled_set,
            e.batch_unlabeled,
            derive_seed(seed, "unlabeled"),
            e.steps,
            start_step,
            session,
        )
        yield from zip(labeled, unlabeled, strict=True)

    def _synthetic_pairs(self, lab: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(degraded, clean, vessel, fov, has_vessel), all cropped to the training size."""
        e = self.config.enhance
        clean, fov = lab["image"], lab["fov"]
        degraded, _ = degrade(clean, fov, generator=self.generators["degrade"], mode=e.degradation_mode)
        degraded = degraded.to(clean.dtype)
        vessel = lab["vessel"]
        if e.degrade_full:
            corners, size = lab["corner"], self.config.data.crop_size
            degraded, clean, vessel, fov = (
                crop_batch(t, corners, size) for t in (degraded, clean, vessel, fov)
            )
        return degraded, clean, vessel, fov, lab["has_vessel"]

    # ---------------------------------------------------------------- step
    def train_step(self, step: int, batch: Any) -> dict[str, float]:
        cfg, loss_cfg = self.config, self.config.enhance.loss
        self.student.train()
        lab = to_float(batch[0], self.device)
        degraded, clean, vessel, _fov, has_vessel = self._synthetic_pairs(lab)
        n = degraded.shape[0]
        inputs = degraded
        unl: dict[str, torch.Tensor] | None = None
        if self.use_teacher and batch[1] is not None:
            unl = to_float(batch[1], self.device)
            inputs = torch.cat([degraded, unl["image"]], dim=0)
        with autocast(self.device, self.amp):
            out = self.model(inputs)
        stage_index = {2: 0, 1: 1}
        parts = self.restoration([im[:n] for im in out.images], clean)
        terms = {"char": parts["char"], "edge": parts["edge"]}
        total = parts["restore"]
        if loss_cfg.use_rsp:
            seg = multiscale_segmentation(
                [v[:n] for v in out.vessel_logits], vessel, loss_cfg.seg_include_avg, weights=has_vessel
            )
            terms["vessel"] = seg
            total = total + loss_cfg.seg_weight * seg
        weight = consistency_weight(step, loss_cfg.consistency_weight, self.rampup)
        if unl is not None:
            noise = torch.randn(unl["image"].shape, generator=self.generators["noise"], device=self.device)
            noisy = (unl["image"] + loss_cfg.noise_std * noise * unl["fov"]).clamp(0.0, 1.0)
            with torch.no_grad(), autocast(self.device, self.amp):
                t_out = self.teacher(noisy)
            picked = [stage_index[s] for s in loss_cfg.stages]
            sides = range(1, len(out.vessel_logits)) if loss_cfg.consistency_on_vessels else range(0)
            cons = consistency_mse(
                [out.images[i][n:] for i in picked],
                [t_out.images[i] for i in picked],
                [out.vessel_logits[i][n:] for i in sides],
                [t_out.vessel_logits[i] for i in sides],
            )
            terms["consistency"] = cons
            total = total + weight * cons
        lr = self.optimizer.param_groups[0]["lr"]
        norm = optimizer_step(total, self.optimizer, self.scaler, self.student, cfg.enhance.optim.grad_clip)
        self.scheduler.step()
        decay = effective_decay(step, cfg.enhance.ema_decay)
        ema_update(self.teacher, self.student, decay)
        values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        values.update({"loss/total": float(total.detach()), "lr": lr, "grad_norm": norm, "ema_decay": decay})
        values["weight/consistency"] = weight if self.use_teacher else 0.0
        return values

    # ---------------------------------------------------------------- validation
    def _validation_set(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Fixed (degraded, clean, fov) triples on the device, degraded once at fixed seeds."""
        if self._val is None:
            size = self.config.data.val_size
            triples = []
            for index, record in enumerate(self.val_records):
                sample = self.cache.load(record)
                image, fov = sample.image, sample.fov
                if size and size != image.shape[0]:
                    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                    fov = cv2.resize(fov, (size, size), interpolation=cv2.INTER_NEAREST)
                clean = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
                fov_t = torch.from_numpy(fov.astype(np.float32))[None]
                degraded, _ = degrade_fixed(
                    clean,
                    fov_t,
                    VAL_SEED + index,
                    types=self.config.data.val_types or None,
                    mode=self.config.enhance.degradation_mode,
                )
                triples.append((degraded.to(self.device), clean.to(self.device), fov_t.to(self.device)))
            self._val = triples
        return self._val

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        if not self.session.env.is_main or not self.val_records:
            return {}
        rows: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_input": [], "ssim_input": []}
        for degraded, clean, fov in self._validation_set():
            with autocast(self.device, self.amp):
                image, _ = self.teacher.infer(degraded[None])
            assert image is not None
            out = image[0].float()
            rows["psnr"].append(psnr(out, clean, fov))
            rows["ssim"].append(ssim(out, clean, fov))
            rows["psnr_input"].append(psnr(degraded, clean, fov))
            rows["ssim_input"].append(ssim(degraded, clean, fov))
        return {f"val/{k}": float(np.mean(v)) for k, v in rows.items()}

    # ---------------------------------------------------------------- state
    def stateful_parts(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }


def train_enhance(
    config: TrainConfig,
    *,
    resume: str | None = None,
    max_minutes: float = 0.0,
    stop_at: int = 0,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) phase 2; exports the weight artifact when the run finishes."""
    session = open_session(config, PHASE, resume=resume, run_dir=run_dir)
    try:
        task = EnhanceTask(session)
        resumes = int(session.resume.get("resumes", 0)) + 1 if session.resume else 0
        result = run_session_loop(
            session,
            task,
            task.batches,
            COLUMNS,
            total_steps=config.enhance.steps,
            max_minutes=max_minutes,
            stop_at=stop_at,
            extra_state=lambda: {"phase": PHASE, "config": config.to_dict(), "resumes": resumes},
        )
        summary: dict[str, Any] = {
            "phase": PHASE,
            "steps": result.step,
            "total_steps": config.enhance.steps,
            "finished": result.finished,
            "wall_time_s": round(result.elapsed_s, 1),
            "resumes": resumes,
            "validation": result.last_val,
            "run_dir": str(session.run_dir),
        }
        if result.finished and config.enhance.export and session.env.is_main:
            out = session.run_dir / "teacher.safetensors"
            training = {
                **summary,
                "exported": config.enhance.export_source,
                "supervised_stages": sorted(set(config.enhance.loss.stages)),
                "mean_teacher": task.use_teacher,
                "hardware": hardware_summary(session.device, session.env),
                "data_roles": session.split.counts(),
                "rsp": {k: v for k, v in task.rsp_info.items() if k != "training"}
                | {"steps": task.rsp_info.get("training", {}).get("steps")},
                "config": config.to_dict(),
            }
            source = task.teacher if config.enhance.export_source == "teacher" else task.student
            save_artifact(
                out,
                source,
                preset=config.model.preset,
                training=training,
                metrics={"validation": result.last_val},
            )
            summary["weights"] = str(out)
        return summary
    finally:
        shutdown_distributed()
