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

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from model.artifact import load_artifact, read_metadata, save_artifact
from model.config import MageNetConfig
from model.device import autocast, conv_memory_format
from model.magenet import MageNet
from model.presets import get_preset
from model.vessels import VesselNet
from training.checkpoint import StatefulParts
from training.config import TrainConfig
from training.datasets import WorkingDataset, crop_batch, derive_seed, to_float
from training.ema import effective_decay, ema_update, make_teacher
from training.loop import optimizer_step
from training.losses import RestorationLoss, consistency_mse, multiscale_segmentation
from training.phase_pseudo import pseudo_dir_path, rsp_weights_path
from training.phase_rsp import make_scaler
from training.prepare import WorkingCache, pseudo_mask_path
from training.runtime import hardware_summary, shutdown_distributed
from training.schedules import consistency_weight, lr_factor
from training.session import Session, make_batches, open_session, prepare_cache, run_session_loop
from training.synthetic import degrade_some
from training.validation import COLUMNS as VALIDATION_COLUMNS
from training.validation import EnhanceValidator, round_robin
from training.vessel_weights import load_vessels

log = logging.getLogger("training")
PHASE = "enhance"
COLUMNS = [
    "lr",
    "loss/char",
    "loss/edge",
    "loss/vessel",
    "loss/consistency",
    "loss/real_vessel",
    "loss/anchor",
    "loss/structure",
    "loss/total",
    "weight/consistency",
    "ema_decay",
    "grad_norm",
    *VALIDATION_COLUMNS,
]
#: The teacher with the best validation score so far (what a finished run exports).
BEST_NAME = "best-teacher.safetensors"


def read_best(path: Path) -> dict[str, Any] | None:
    """The ``selected`` record (score, step, validation) of a best-teacher file, if there is one."""
    if not path.is_file():
        return None
    selected = read_metadata(path).get("training", {}).get("selected")
    return selected if isinstance(selected, dict) and "score" in selected else None


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
        # How the vessel branch is kept on its phase-1 behaviour (see LossConfig.vessel_anchor).
        self.anchor = loss.vessel_anchor if loss.use_rsp else "free"
        self.reference: VesselNet | None = None
        if loss.use_rsp:
            path = rsp_weights_path(cfg, e.rsp_checkpoint)
            self.rsp_info = {"weights": str(path), **load_vessels(path, self.student.vessels, preset.vessels)}
            if loss.structure_weight > 0 or self.anchor == "distill":
                self.reference = copy.deepcopy(self.student.vessels).eval().requires_grad_(False)
                self.reference.to(self.device, memory_format=conv_memory_format(self.device))
            if self.anchor == "frozen":
                self.student.vessels.requires_grad_(False)
        if e.init_weights:
            self._start_from(e.init_weights, preset)
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
            self._param_groups(o.lr, loss.vessel_lr_scale), betas=tuple(o.betas), weight_decay=o.weight_decay
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
        held_out = split.with_role("val")
        self.validator = EnhanceValidator(
            cfg,
            round_robin(split.held_out_clean(cfg.data), cfg.data.val_images),
            [r for r in held_out if r.set in cfg.data.unlabeled_sets and r.vessel is not None],
            self.cache,
            self.device,
        )
        prepare_cache(self.labeled + self.unlabeled + self.validator.records, self.cache, session)
        self.best = read_best(session.run_dir / BEST_NAME) if session.resume else None
        pseudo = pseudo_dir_path(cfg, e.pseudo_dir)
        self.labeled_set = WorkingDataset(
            self.labeled,
            self.cache,
            cfg.data.crop_size,
            crop_here=not e.degrade_full,
            pseudo_dir=pseudo,
            with_vessels=loss.use_rsp,
        )
        # Real photographs with manual masks (CHASE_DB1) keep a trainable vessel branch calibrated.
        self.real_vessels = loss.real_vessel_weight > 0 and loss.use_rsp and self.anchor != "frozen"
        self.unlabeled_set = WorkingDataset(
            self.unlabeled, self.cache, cfg.data.crop_size, with_vessels=self.real_vessels
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

    def _start_from(self, path: str, preset: MageNetConfig) -> None:
        """Load a whole artifact of the same preset into the student (the teacher copies it next).

        The vessel branch comes along with the restorer; the frozen reference stays the phase-1
        branch loaded from ``rsp_checkpoint``.
        """
        artifact = load_artifact(path, "cpu")
        if artifact.config != preset:
            name, preset_name = Path(path).name, self.config.model.preset
            raise ValueError(f"{name} is a {artifact.preset!r} model; this run trains {preset_name!r}")
        with torch.no_grad():
            self.student.load_state_dict(artifact.model.state_dict(), strict=True)
        self.rsp_info["init_weights"] = {"path": str(path), "sha256": artifact.sha256}

    def _param_groups(self, lr: float, vessel_lr_scale: float) -> list[dict[str, Any]]:
        """Adam groups: the restorer at ``lr``, the trainable vessel branch at ``lr · scale``."""
        restorer = [p for n, p in self.student.named_parameters() if not n.startswith("vessels.")]
        vessels = [p for p in self.student.vessels.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": restorer, "lr": lr}]
        if vessels:
            groups.append({"params": vessels, "lr": lr * vessel_lr_scale})
        return groups

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
        degraded = degrade_some(
            clean, fov, self.generators["degrade"], keep_prob=e.identity_prob, mode=e.degradation_mode
        )
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
        degraded, clean, vessel, fov, has_vessel = self._synthetic_pairs(lab)
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
            trainable = self.anchor != "frozen"
            with torch.set_grad_enabled(trainable):  # a frozen branch's loss is only logged
                seg = multiscale_segmentation(
                    [v[:n] for v in out.vessel_logits], vessel, loss_cfg.seg_include_avg, weights=has_vessel
                )
            terms["vessel"] = seg
            if trainable:
                total = total + loss_cfg.seg_weight * seg
            if self.real_vessels and unl is not None:
                real = multiscale_segmentation(
                    [v[n:] for v in out.vessel_logits],
                    unl["vessel"],
                    loss_cfg.seg_include_avg,
                    weights=unl["has_vessel"],
                )
                terms["real_vessel"] = real
                total = total + loss_cfg.real_vessel_weight * real
            if self.anchor == "distill":
                assert self.reference is not None
                anchor = self._distillation(inputs, out.vessel_logits)
                terms["anchor"] = anchor
                total = total + loss_cfg.anchor_weight * anchor
            if loss_cfg.structure_weight > 0:
                structure = self._structure(out.images[0][:n], clean, fov)
                terms["structure"] = structure
                total = total + loss_cfg.structure_weight * structure
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

    def _distillation(self, inputs: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """Σ over the four sides of MSE(softmax student, softmax frozen phase-1 branch) on ``inputs``."""
        assert self.reference is not None
        with torch.no_grad(), autocast(self.device, self.amp):
            anchor = self.reference(inputs).logits
        return consistency_mse([], [], logits[1:], anchor[1:])

    def _structure(self, restored: torch.Tensor, clean: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
        """FOV-mean squared difference of the frozen branch's vessel probability on restored vs clean.

        restored, clean: (B, 3, h, w); fov: (B, 1, h, w) in {0, 1}.
        """
        assert self.reference is not None
        with torch.no_grad(), autocast(self.device, self.amp):
            target = torch.softmax(self.reference(clean).logits[-1].float(), dim=1)[:, 1:2]
        with autocast(self.device, self.amp):
            logits = self.reference(restored).logits[-1]
        prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
        return ((prob - target) ** 2 * fov).sum() / fov.sum().clamp_min(1.0)

    # ---------------------------------------------------------------- validation
    @property
    def exported(self) -> torch.nn.Module:
        """The weights the run exports (``enhance.export_source``): validation scores and keeps these."""
        return self.teacher if self.config.enhance.export_source == "teacher" else self.student

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        if not self.session.env.is_main or not self.validator.records:
            return {}
        values = self.validator.run(self.exported)
        self._keep_if_best(step, values)
        return values

    def _keep_if_best(self, step: int, values: dict[str, float]) -> None:
        """Write the teacher to ``best-teacher.safetensors`` when its validation score is the best yet."""
        score = values.get("val/score")
        if score is None or (self.best is not None and score <= self.best["score"]):
            return
        self.best = {"score": score, "step": step, "validation": values}
        save_artifact(
            self.session.run_dir / BEST_NAME,
            self.exported,
            preset=self.config.model.preset,
            training={"selected": self.best},
        )
        log.info("step %d: best validation score so far (%.3f)", step, score)

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
            source = task.exported
            validation = result.last_val
            if task.best is not None:
                # The weights chosen on validation, not simply the last ones.
                source = load_artifact(session.run_dir / BEST_NAME, "cpu").model
                training["selected"] = task.best
                validation = task.best["validation"]
            save_artifact(
                out,
                source,
                preset=config.model.preset,
                training=training,
                metrics={"validation": validation},
            )
            summary["weights"] = str(out)
        return summary
    finally:
        shutdown_distributed()
