"""The bundled teacher weights load and really enhance a degraded real fundus photograph."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.artifact import BUNDLED_WEIGHTS, load_artifact
from model.degradation import degrade_image
from model.fov import plan_crop, to_working, working_fov_mask
from model.fov_detect import detect_fov


def fov_psnr(pred: torch.Tensor, target: torch.Tensor, inside: torch.Tensor) -> float:
    """PSNR in dB over the FOV pixels of two [3, S, S] images on [0, 1]."""
    diff = (pred.clamp(0, 1) - target)[:, inside]
    return 10.0 * math.log10(1.0 / float((diff * diff).mean()))


def test_bundled_artifact_metadata() -> None:
    artifact = load_artifact(BUNDLED_WEIGHTS)
    assert artifact.preset == "lite"
    assert artifact.config.working_size == 512
    assert artifact.training.get("steps", 0) > 0
    assert BUNDLED_WEIGHTS.stat().st_size < 50 * 1024 * 1024


def test_bundled_weights_raise_psnr_of_a_degraded_test_image(data_root: Path) -> None:
    artifact = load_artifact(BUNDLED_WEIGHTS)
    size = artifact.config.working_size
    photo = np.asarray(Image.open(data_root / "hrf" / "images" / "01_h.jpg").convert("RGB"))
    crop = plan_crop(detect_fov(photo), photo.shape[0], photo.shape[1], size)
    clean = torch.from_numpy(to_working(photo, crop)).permute(2, 0, 1).float() / 255.0
    fov = torch.from_numpy(working_fov_mask(crop))[None]
    degraded, _ = degrade_image(clean, fov, seed=3, types=("illumination", "spot", "blur"), mode="cofe")
    enhanced, _ = artifact.model.infer(degraded[None])
    assert enhanced is not None
    inside = fov[0] > 0.5
    before = fov_psnr(degraded, clean, inside)
    after = fov_psnr(enhanced[0], clean, inside)
    assert after > before + 0.5, f"PSNR {before:.2f} dB degraded vs {after:.2f} dB enhanced"
