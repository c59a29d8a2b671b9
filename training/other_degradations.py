"""Degradations outside the training family: does the model help, leave alone or harm?

The synthetic pairs come from Cofe-Net's degradation model (light disturbance, spots, blur), and the
main evaluation scores the model on the same family. Poor photographs in a clinic also suffer
faults that model does not render: a defocused or shaken camera, heavy JPEG compression, sensor
noise, an underexposed shot, the milky veil of a cataract. ``fundus eval --other-degradations``
applies each of :data:`DEGRADATIONS` to the clean working image of every synthetic evaluation
photograph and reports, per kind, the PSNR/SSIM of the degraded input and of the model's answer
against the clean image inside the FOV, the mean and worst gain, and how many photographs the model
made worse (gain below :data:`HARM_DB`). A restorer that has not learned a fault should at least
leave it alone.

Sizes are given for a 512² working image and scaled with the working size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from training.do_no_harm import EnhanceFn
from training.metrics import image_tensor, psnr, ssim

#: A gain below this (dB) counts as making the photograph worse.
HARM_DB = -0.5

#: (image (S, S, 3) uint8 RGB, seed) → degraded image, same shape and dtype.
Degradation = Callable[[np.ndarray, int], np.ndarray]


def _scale(image: np.ndarray) -> float:
    return min(image.shape[:2]) / 512.0


def defocus(image: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-focus camera: Gaussian blur, sigma 2 px at 512²."""
    return cv2.GaussianBlur(image, (0, 0), 2.0 * _scale(image))


def motion(image: np.ndarray, seed: int) -> np.ndarray:
    """Camera or eye movement: a 9-px line kernel at 512², at a seeded angle."""
    length = max(3, round(9 * _scale(image)) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    angle = float(np.random.default_rng(seed).uniform(0.0, 180.0))
    rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    return cv2.filter2D(image, -1, kernel / kernel.sum())


def jpeg(image: np.ndarray, seed: int) -> np.ndarray:
    """Heavy compression on the way from the camera: JPEG at quality 15."""
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 15])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def noise(image: np.ndarray, seed: int) -> np.ndarray:
    """Sensor noise of a dim exposure: Gaussian, sigma 8 grey levels, seeded."""
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)


def underexposure(image: np.ndarray, seed: int) -> np.ndarray:
    """A dark shot (small pupil, weak flash): gamma 1.8."""
    return (255.0 * (image / 255.0) ** 1.8).round().astype(np.uint8)


def veil(image: np.ndarray, seed: int) -> np.ndarray:
    """A cataract's milky veil: 40 % of the way to a warm grey, contrast lost everywhere."""
    tint = np.array([200.0, 180.0, 150.0])
    return np.clip(0.6 * image + 0.4 * tint, 0, 255).round().astype(np.uint8)


DEGRADATIONS: dict[str, Degradation] = {
    "defocus": defocus,
    "motion": motion,
    "jpeg": jpeg,
    "noise": noise,
    "underexposure": underexposure,
    "veil": veil,
}


def score_image(
    clean: np.ndarray, fov: np.ndarray, seed: int, enhance: EnhanceFn
) -> dict[str, dict[str, float]]:
    """``{kind: {psnr_degraded, psnr_model, ssim_degraded, ssim_model}}`` for one clean working image
    (S, S, 3) uint8 with FOV (S, S) {0,1}; outside the FOV the degraded image stays black."""
    outside = fov == 0
    clean_t, fov_t = image_tensor(clean), torch.from_numpy(fov.astype(np.float32))
    scores: dict[str, dict[str, float]] = {}
    for kind, degrade in DEGRADATIONS.items():
        degraded = degrade(clean, seed)
        degraded[outside] = 0
        answer = image_tensor(enhance(degraded))
        degraded_t = image_tensor(degraded)
        scores[kind] = {
            "psnr_degraded": psnr(degraded_t, clean_t, fov_t),
            "psnr_model": psnr(answer, clean_t, fov_t),
            "ssim_degraded": ssim(degraded_t, clean_t, fov_t),
            "ssim_model": ssim(answer, clean_t, fov_t),
        }
    return scores


def summarise_kinds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind over photographs (rows of :func:`score_image`, other keys ignored): mean PSNR/SSIM in
    and out, mean and worst gain, photographs harmed."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in DEGRADATIONS:
        scores = [row[kind] for row in rows if kind in row]
        if not scores:
            continue
        gains = [s["psnr_model"] - s["psnr_degraded"] for s in scores if math.isfinite(s["psnr_degraded"])]
        summary[kind] = {
            "photos": len(scores),
            **{key: float(np.mean([s[key] for s in scores])) for key in scores[0]},
            "psnr_gain_mean": float(np.mean(gains)) if gains else math.nan,
            "psnr_gain_worst": float(min(gains)) if gains else math.nan,
            "harmed": sum(g < HARM_DB for g in gains),
        }
    return summary
