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


def test_a_degraded_real_photograph_gains_through_http_enhance_at_native_resolution(
    data_root: Path,
) -> None:
    """What a user sees: a 768-pixel-wide test photograph, degraded by ``POST /degrade`` at fixed
    seeds, enhanced by ``POST /enhance`` at its own geometry, scored in its FOV against the clean copy."""
    import io

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    photo = Image.open(data_root / "hrf" / "images" / "01_dr.jpg").convert("RGB")
    photo = photo.resize((768, 512), Image.Resampling.LANCZOS)
    mask = (
        Image.open(data_root / "hrf" / "fov" / "01_dr.png")
        .convert("L")
        .resize((768, 512), Image.Resampling.NEAREST)
    )
    inside = torch.from_numpy(np.asarray(mask) > 127)
    clean = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255.0
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        weights=BUNDLED_WEIGHTS,
        device="cpu",
        warmup=False,
        api_keys="",
        redis_url=None,
        log_level="WARNING",
    )

    def tensor(data: bytes) -> torch.Tensor:
        image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0

    gains = []
    with TestClient(create_app(settings)) as client:
        for seed in (1, 2, 3):
            degraded = client.post(
                f"/degrade?seed={seed}&mode=cofe&types=illumination,spot,blur",
                content=buffer.getvalue(),
                headers={"content-type": "image/png"},
            )
            assert degraded.status_code == 200
            enhanced = client.post(
                "/enhance", content=degraded.content, headers={"content-type": "image/png"}
            )
            assert enhanced.status_code == 200 and enhanced.headers["x-fov"] == "fitted"
            before = fov_psnr(tensor(degraded.content), clean, inside)
            after = fov_psnr(tensor(enhanced.content), clean, inside)
            gains.append(after - before)
    assert float(np.mean(gains)) >= 2.0, [round(g, 2) for g in gains]
