"""Phase-2 validation: what the exported weights are chosen on (never the test split).

Every ``val_every`` steps the weights the run exports (the EMA teacher unless
``enhance.export_source: student``) are scored on held-out images of the training sets:

* synthetic pairs at the working size and at the photographs' own geometry through the service's
  restore path (:func:`training.evaluate.evaluate_working` / :func:`~training.evaluate.evaluate_native`),
  including the clean photograph itself ("do no harm");
* the AUC of the independent segmenter (clean photographs only) and of the model's own vessel branch
  on clean, degraded and enhanced copies, i.e. whether restoration makes vessels easier or harder to
  find;
* the model's own vessel branch on real photographs with manual masks (CHASE_DB1): AUC and IoU
  at the served threshold 0.5.

:func:`selection_score` turns that into one number: the mean PSNR gain at both resolutions, with
large penalties for a restoration that hides vessels from the independent segmenter or that harms
clean photographs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.evaluate import (
    evaluate_native,
    evaluate_working,
    independent_function,
    model_functions,
    native_copy,
)
from training.metrics import image_tensor, vessel_metrics
from training.prepare import WorkingCache
from training.segmenter import DEFAULT_SEGMENTER
from training.sources import ImageRecord

log = logging.getLogger("training")
VAL_SEED = 20_000
#: A clean photograph through the model must stay at least this close to itself (dB).
DO_NO_HARM_DB = 30.0
COLUMNS = [
    "val/psnr",
    "val/ssim",
    "val/psnr_input",
    "val/ssim_input",
    "val/psnr_clean",
    "val/native_psnr",
    "val/native_ssim",
    "val/native_psnr_input",
    "val/native_ssim_input",
    "val/native_psnr_clean",
    "val/psnr_clean_worst",
    "val/indep_auc_clean",
    "val/indep_auc_input",
    "val/indep_auc",
    "val/vessel_auc_clean",
    "val/vessel_auc_input",
    "val/vessel_auc",
    "val/real_vessel_auc",
    "val/real_vessel_iou",
    "val/score",
]


def round_robin(records: Iterable[ImageRecord], count: int) -> list[ImageRecord]:
    """Up to ``count`` records taking one set after another, so no set crowds the others out."""
    by_set: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_set.setdefault(record.set, []).append(record)
    queues = [by_set[name] for name in sorted(by_set)]
    picked: list[ImageRecord] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def segmenter_path(config: TrainConfig) -> Path | None:
    """The independent segmenter validation uses: configured, this run's, or the shipped one."""
    for candidate in (
        Path(config.segmenter.weights) if config.segmenter.weights else None,
        config.phase_dir("segmenter") / "segmenter.safetensors",
        DEFAULT_SEGMENTER,
    ):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def selection_score(values: dict[str, float]) -> float:
    """Higher is better: mean PSNR gain (dB) at both resolutions, penalised by 10 dB for each guard
    that fails (vessels harder to find for the independent segmenter; any one clean photograph
    harmed: the worst one, not the mean, must stay above :data:`DO_NO_HARM_DB`, since a mean over
    cameras hides one that the model alters)."""
    gains = [values["val/psnr"] - values["val/psnr_input"]]
    if "val/native_psnr" in values:
        gains.append(values["val/native_psnr"] - values["val/native_psnr_input"])
    score = float(np.mean(gains))
    if "val/indep_auc" in values and values["val/indep_auc"] < values["val/indep_auc_input"]:
        score -= 10.0
    clean = values.get("val/psnr_clean_worst")
    if clean is None:  # logs written before the worst photograph was recorded
        clean = min(values.get("val/psnr_clean", np.inf), values.get("val/native_psnr_clean", np.inf))
    if clean < DO_NO_HARM_DB:
        score -= 10.0
    return score


class EnhanceValidator:
    """Scores a MAGE-Net on fixed validation images (see the module docstring).

    Args:
        config: the run's config (``data.val_images``, ``data.val_native_max_side``, mode).
        synthetic: clean validation records (targets of synthetic pairs).
        real: real validation photographs with manual vessel masks.
        cache: working-size cache.
        device: where the model runs.
    """

    def __init__(
        self,
        config: TrainConfig,
        synthetic: list[ImageRecord],
        real: list[ImageRecord],
        cache: WorkingCache,
        device: torch.device,
    ) -> None:
        self.config = config
        self.synthetic = synthetic
        self.real = real
        self.cache = cache
        self.device = device
        path = segmenter_path(config)
        self.independent = independent_function(path, device)
        if self.independent is None:
            log.warning("no independent segmenter found: validation reports no independent vessel AUC")
        else:
            log.info("validation uses the independent segmenter %s", path)

    @property
    def records(self) -> list[ImageRecord]:
        return self.synthetic + self.real

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        """Validation scalars (``val/*``), ``val/score`` included."""
        enhance, segment = model_functions(model, self.device)
        mode = self.config.enhance.degradation_mode
        rows = []
        for index, record in enumerate(self.synthetic):
            sample = self.cache.load(record)
            row, _ = evaluate_working(
                sample.image,
                sample.fov,
                sample.vessel,
                VAL_SEED + index,
                enhance=enhance,
                segment=segment,
                independent=self.independent,
                mode=mode,
            )
            if self.config.data.val_native_max_side >= 0:
                photo = native_copy(record, self.config.data.val_native_max_side)
                size = self.config.data.working_size
                row.update(
                    evaluate_native(
                        photo, VAL_SEED + index, size=size, enhance=enhance, independent=None, mode=mode
                    )
                )
            rows.append(row)
        names = {
            "val/psnr": "psnr_model",
            "val/ssim": "ssim_model",
            "val/psnr_input": "psnr_degraded",
            "val/ssim_input": "ssim_degraded",
            "val/psnr_clean": "psnr_clean_model",
            "val/native_psnr": "native_psnr_model",
            "val/native_ssim": "native_ssim_model",
            "val/native_psnr_input": "native_psnr_degraded",
            "val/native_ssim_input": "native_ssim_degraded",
            "val/native_psnr_clean": "native_psnr_clean_model",
            "val/indep_auc_clean": "indep_auc_clean",
            "val/indep_auc_input": "indep_auc_degraded",
            "val/indep_auc": "indep_auc_enhanced",
            "val/vessel_auc_clean": "vessel_auc_clean",
            "val/vessel_auc_input": "vessel_auc_degraded",
            "val/vessel_auc": "vessel_auc_enhanced",
        }
        values: dict[str, float] = {}
        for column, key in names.items():
            found = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
            if found:
                values[column] = float(np.mean(found))
        clean_scores = [
            r[key]
            for r in rows
            for key in ("psnr_clean_model", "native_psnr_clean_model")
            if r.get(key) is not None and np.isfinite(r[key])
        ]
        if clean_scores:
            values["val/psnr_clean_worst"] = float(min(clean_scores))
        real = [self._real_vessels(record, segment) for record in self.real]
        if real:
            values["val/real_vessel_auc"] = float(np.mean([r["auc"] for r in real]))
            values["val/real_vessel_iou"] = float(np.mean([r["iou"] for r in real]))
        if "val/psnr" in values:
            values["val/score"] = selection_score(values)
        return values

    def _real_vessels(self, record: ImageRecord, segment: object) -> dict[str, float]:
        sample = self.cache.load(record)
        assert sample.vessel is not None and callable(segment)
        fov = torch.from_numpy(sample.fov.astype(np.float32))
        return vessel_metrics(segment(image_tensor(sample.image)), torch.from_numpy(sample.vessel), fov)
