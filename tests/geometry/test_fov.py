"""FOV geometry: detection on real and synthetic photographs, working crops, and mapping back."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.degradation import degrade
from model.fov import (
    FovCircle,
    FovNotFound,
    SquareCrop,
    fov_mask,
    from_working,
    plan_crop,
    to_working,
    working_fov_mask,
)
from model.fov_detect import _percentile_u8, detect_fov


def _read(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a & b) / np.count_nonzero(a | b))


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    diff = a.astype(np.float64)[mask] - b.astype(np.float64)[mask]
    return float(10 * np.log10(255.0**2 / np.mean(diff**2)))


def _synthetic_fundus(
    height: int, width: int, circle: FovCircle, background: int, seed: int = 0
) -> np.ndarray:
    """A textured reddish disk (with darker vessels-like stripes and a vignetted rim) on a flat background."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    distance = np.hypot(xs - circle.cx, ys - circle.cy) / circle.radius
    shade = np.clip(1.0 - 0.6 * distance**4, 0.2, 1.0)
    texture = 0.85 + 0.15 * np.sin(xs / 7.0) * np.cos(ys / 11.0) + rng.normal(0, 0.03, (height, width))
    colour = np.stack([190 * shade * texture, 80 * shade * texture, 30 * shade * texture], axis=2)
    image = np.full((height, width, 3), background, dtype=np.float64)
    inside = fov_mask(height, width, circle)
    image[inside] = colour[inside]
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("stem", ["01_dr", "05_g", "09_h", "12_dr", "14_h"])
def test_detect_fov_matches_the_hrf_masks(stem: str, data_root: Path) -> None:
    image = _read(data_root / "hrf" / "images" / f"{stem}.jpg")
    truth = cv2.imread(str(data_root / "hrf" / "fov" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 127
    circle = detect_fov(image)
    assert _iou(fov_mask(*image.shape[:2], circle), truth) > 0.95


@pytest.mark.parametrize(
    ("relative", "radius_range"),
    [
        ("chase_db1/images/Image_01L.jpg", (0.40, 0.55)),
        ("chase_db1/images/Image_07R.jpg", (0.40, 0.55)),
        ("fives/images/10_A.jpg", (0.44, 0.52)),
        ("fives/images/27_A.jpg", (0.44, 0.52)),
        ("idrid/images/IDRiD_005.jpg", (0.55, 0.70)),
        ("idrid/images/IDRiD_115.jpg", (0.55, 0.70)),
        ("deepdrid/images/100_l2.jpg", (0.42, 0.52)),
        ("deepdrid/images/406_l2.jpg", (0.42, 0.52)),
    ],
)
def test_detect_fov_is_plausible_on_other_cameras(
    relative: str, radius_range: tuple[float, float], data_root: Path
) -> None:
    image = _read(data_root / relative)
    height, width = image.shape[:2]
    circle = detect_fov(image)
    assert abs(circle.cx - width / 2) < 0.08 * width
    assert abs(circle.cy - height / 2) < 0.08 * height
    low, high = radius_range
    assert low * min(height, width) <= circle.radius <= high * min(height, width)


def test_detect_fov_on_a_bright_background() -> None:
    truth = FovCircle(cx=300.0, cy=250.0, radius=210.0)
    image = _synthetic_fundus(500, 600, truth, background=245)
    circle = detect_fov(image)
    assert _iou(fov_mask(500, 600, circle), fov_mask(500, 600, truth)) > 0.98


def test_detect_fov_on_a_circle_clipped_top_and_bottom() -> None:
    truth = FovCircle(cx=400.0, cy=260.0, radius=330.0)
    image = _synthetic_fundus(520, 800, truth, background=0)
    circle = detect_fov(image)
    assert abs(circle.radius - truth.radius) < 0.02 * truth.radius
    assert _iou(fov_mask(520, 800, circle), fov_mask(520, 800, truth)) > 0.98


def test_burned_in_text_outside_the_fov_does_not_disturb_detection() -> None:
    truth = FovCircle(cx=320.0, cy=240.0, radius=220.0)
    image = _synthetic_fundus(480, 640, truth, background=0)
    cv2.putText(image, "2018-06-04 L", (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    circle = detect_fov(image)
    assert _iou(fov_mask(480, 640, circle), fov_mask(480, 640, truth)) > 0.98
    crop = plan_crop(circle, 480, 640, working_size=256)
    working = to_working(image, crop)
    assert working[:20, :20].max() == 0  # the corner (where the text maps) is blanked


def _text_screenshot() -> np.ndarray:
    image = np.full((400, 600, 3), 255, dtype=np.uint8)
    for row in range(8):
        cv2.putText(
            image,
            "Lorem ipsum dolor sit amet",
            (10, 40 + 45 * row),
            cv2.FONT_HERSHEY_SIMPLEX,
            1.0,
            (0, 0, 0),
            2,
        )
    return image


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((300, 300, 3), dtype=np.uint8),
        np.full((300, 400, 3), 255, dtype=np.uint8),
        np.full((300, 400, 3), 128, dtype=np.uint8),
        _text_screenshot(),
        np.full((16, 16, 3), 100, dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
        cv2.rectangle(np.zeros((300, 400, 3), np.uint8), (50, 50), (350, 250), (200, 100, 50), -1),
    ],
    ids=["black", "white", "grey", "text", "tiny", "noise", "rectangle"],
)
def test_no_fundus_raises_fov_not_found(image: np.ndarray) -> None:
    with pytest.raises(FovNotFound):
        detect_fov(image)


def test_detect_fov_rejects_wrong_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        detect_fov(np.zeros((100, 100, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        detect_fov(np.zeros((100, 100), dtype=np.uint8))


def test_plan_crop_and_working_geometry() -> None:
    circle = FovCircle(cx=400.0, cy=260.0, radius=330.0)
    crop = plan_crop(circle, 520, 800, working_size=256)
    assert isinstance(crop, SquareCrop)
    assert crop.side >= 2 * circle.radius and crop.y0 < 0  # the box leaves the frame at the top
    inner = crop.working_circle
    assert inner.cx == pytest.approx(127.5, abs=1.0) and inner.cy == pytest.approx(127.5, abs=1.0)
    assert inner.radius == pytest.approx(128 * 2 * 330 / crop.side, rel=1e-6)

    image = _synthetic_fundus(520, 800, circle, background=0)
    working = to_working(image, crop)
    assert working.shape == (256, 256, 3) and working.dtype == np.uint8
    outside = ~fov_mask(256, 256, inner)
    assert working[outside].max() == 0

    mask = working_fov_mask(crop)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert mask[128, 128] == pytest.approx(1.0) and mask[128, 2] > 0.5
    # The rows the camera clipped are padding, not field of view.
    assert mask[:20].max() == 0 and mask[-20:].max() == 0
    assert mask.min() >= 0.0 and mask.max() <= 1.0


def test_from_working_resize_restores_the_original_geometry(data_root: Path) -> None:
    image = _read(data_root / "chase_db1" / "images" / "Image_01L.jpg")
    height, width = image.shape[:2]
    circle = detect_fov(image)
    crop = plan_crop(circle, height, width)
    working = to_working(image, crop)
    back = from_working(working, crop, image, method="resize")
    assert back.shape == image.shape and back.dtype == np.uint8
    inside = fov_mask(height, width, FovCircle(circle.cx, circle.cy, circle.radius - 3))
    outside = ~fov_mask(height, width, FovCircle(circle.cx, circle.cy, circle.radius + 1))
    assert np.array_equal(back[outside], image[outside])
    assert _psnr(back, image, inside) > 30
    # A single-channel map (vessel probabilities) comes back as [H, W].
    vessels = working[..., 1]
    assert from_working(vessels, crop, image).shape == (height, width)


def test_transfer_beats_resize_on_an_hrf_illumination_oracle(data_root: Path) -> None:
    """Degrade an HRF photograph at native resolution, use the clean working crop as a perfect
    enhancement, map it back both ways and score against the clean native photograph."""
    clean = _read(data_root / "hrf" / "images" / "02_h.jpg")
    height, width = clean.shape[:2]
    circle = detect_fov(clean)
    inside = fov_mask(height, width, circle)
    tensor = torch.from_numpy(clean).permute(2, 0, 1).float()[None] / 255
    out, _ = degrade(
        tensor,
        torch.from_numpy(inside).float()[None, None],
        generator=torch.Generator().manual_seed(0),
        types=["illumination"],
    )
    degraded = (out[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    degraded = np.where(inside[..., None], degraded, clean)

    crop = plan_crop(circle, height, width)
    working_input = to_working(degraded, crop)
    oracle = to_working(clean, crop)
    resized = from_working(oracle, crop, degraded, working_input=working_input, method="resize")
    transferred = from_working(oracle, crop, degraded, working_input=working_input, method="transfer")
    implicit = from_working(oracle, crop, degraded, method="transfer")
    assert np.array_equal(transferred, implicit)
    psnr_resize = _psnr(resized, clean, inside)
    psnr_transfer = _psnr(transferred, clean, inside)
    assert psnr_transfer > psnr_resize + 2.0, (psnr_transfer, psnr_resize)
    outside = ~fov_mask(height, width, FovCircle(circle.cx, circle.cy, circle.radius + 1))
    assert np.array_equal(transferred[outside], degraded[outside])


def test_from_working_rejects_mismatched_inputs() -> None:
    circle = FovCircle(100.0, 100.0, 90.0)
    crop = plan_crop(circle, 200, 200, working_size=64)
    original = np.zeros((200, 200, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="method"):
        from_working(np.zeros((64, 64, 3), np.uint8), crop, original, method="lanczos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="working size"):
        from_working(np.zeros((32, 32, 3), np.uint8), crop, original)
    with pytest.raises(ValueError, match="original"):
        from_working(np.zeros((64, 64, 3), np.uint8), crop, original[:100])


def test_histogram_percentile_is_numpys_number() -> None:
    """The detector's threshold level reads the percentile off a histogram: exactly numpy's value."""
    rng = np.random.default_rng(7)
    for size in (1, 2, 3, 10, 997, 384 * 288):
        for top in (1, 17, 255):
            values = rng.integers(0, top + 1, size, dtype=np.uint8)
            for q in (0, 10, 33.3, 50, 90, 99.5, 100):
                assert _percentile_u8(values, q) == float(np.percentile(values, q)), (size, top, q)
