"""A camera zoo: real fundus photographs re-rendered the way other cameras and workflows deliver them.

Each photograph's field of view (from its FOV mask, or detected on the unmodified photograph) is
re-drawn onto a new frame whose geometry is known exactly, then the requested variations are applied:

* geometry: ``clip_tb`` / ``clip_lr`` (circle clipped by the frame on two sides), ``clip_one``
  (clipped on one side), ``tight`` (cropped to the disc: no background at all);
* rim: ``notch`` (a small square notch), ``tab`` (a bright marker tab outside the rim);
* background and light: ``tinted`` (dark, non-black, tinted, grainy background), ``vignette``
  (strong darkening towards the rim), ``haze`` (black level lifted: ×0.9 + 6…20), ``dark``,
  ``low_contrast``;
* encoding and overlays: ``jpeg30``, ``text`` (burned-in text in a corner), ``scale_bar``.

:func:`render` returns the image and the true circle (``None`` for ``tight``, where the circle runs
outside the frame on every side and cannot be known from the picture).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model.fov import FovCircle

VARIATIONS = (
    "clip_tb",
    "clip_lr",
    "clip_one",
    "notch",
    "tab",
    "tinted",
    "vignette",
    "haze",
    "dark",
    "low_contrast",
    "jpeg30",
    "text",
    "scale_bar",
    "tight",
)
GEOMETRIES = ("clip_tb", "clip_lr", "clip_one", "tight")


@dataclass
class ZooCase:
    """One rendered photograph."""

    name: str
    image: np.ndarray
    circle: FovCircle | None


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def source_circle(image: np.ndarray, fov_mask: np.ndarray | None) -> FovCircle:
    """The photograph's own FOV circle: from its mask when there is one, else detected."""
    if fov_mask is not None:
        # Least squares through the mask's outline, leaving out where the frame clips it.
        contours, _ = cv2.findContours(
            (fov_mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        points = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
        h, w = fov_mask.shape
        x, y = points[:, 0], points[:, 1]
        keep = (x > 1) & (x < w - 2) & (y > 1) & (y < h - 2)
        x, y = x[keep], y[keep]
        (a, b, c), *_ = np.linalg.lstsq(np.stack([x, y, np.ones_like(x)], axis=1), x * x + y * y, rcond=None)
        return FovCircle(a / 2, b / 2, float(np.sqrt(c + a * a / 4 + b * b / 4)))
    from model.fov_detect import estimate_fov

    return estimate_fov(image).circle


def _frame(geometry: str | None, size: int, rng: np.random.Generator) -> tuple[int, int, FovCircle]:
    """(height, width, circle) of the new frame; ``size`` is its longer side."""
    if geometry == "clip_tb":
        width, height = size, round(size * rng.uniform(0.6, 0.75))
        radius = height * rng.uniform(0.55, 0.7)
        return height, width, FovCircle((width - 1) / 2, (height - 1) / 2, radius)
    if geometry == "clip_lr":
        height, width = size, round(size * rng.uniform(0.6, 0.75))
        radius = width * rng.uniform(0.55, 0.7)
        return height, width, FovCircle((width - 1) / 2, (height - 1) / 2, radius)
    if geometry == "clip_one":
        width, height = size, round(size * rng.uniform(0.7, 0.85))
        radius = height * 0.45
        side = rng.integers(4)
        cx, cy = (width - 1) / 2, (height - 1) / 2
        shift = radius * rng.uniform(0.15, 0.3)
        if side == 0:
            cy = radius - shift
        elif side == 1:
            cy = height - 1 - radius + shift
        elif side == 2:
            cx = radius - shift
        else:
            cx = width - 1 - radius + shift
        return height, width, FovCircle(cx, cy, radius)
    width, height = size, round(size * rng.uniform(0.66, 1.0))
    radius = height * rng.uniform(0.4, 0.47)
    return (
        height,
        width,
        FovCircle((width - 1) / 2 + rng.uniform(-0.05, 0.05) * width, (height - 1) / 2, radius),
    )


def _place(photo: np.ndarray, source: FovCircle, height: int, width: int, target: FovCircle) -> np.ndarray:
    """Map the photograph's FOV circle onto ``target`` in a new ``height × width`` float frame."""
    scale = target.radius / source.radius
    matrix = np.float32(
        [[scale, 0, target.cx - scale * source.cx], [0, scale, target.cy - scale * source.cy]]
    )
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    placed = cv2.warpAffine(photo, matrix, (width, height), flags=interpolation, borderValue=(0, 0, 0))
    return placed.astype(np.float32)


def _disk(height: int, width: int, circle: FovCircle) -> np.ndarray:
    ys = np.arange(height, dtype=np.float32)[:, None] - circle.cy
    xs = np.arange(width, dtype=np.float32)[None, :] - circle.cx
    distance = np.sqrt(xs * xs + ys * ys)
    return np.clip(circle.radius - distance + 0.5, 0.0, 1.0), distance / circle.radius


def render(
    photo: np.ndarray,
    source: FovCircle,
    variations: tuple[str, ...],
    size: int,
    seed: int,
    name: str = "",
) -> ZooCase:
    """Re-render ``photo`` (its FOV is ``source``) with ``variations`` at longer side ``size``."""
    unknown = set(variations) - set(VARIATIONS)
    assert not unknown, unknown
    rng = np.random.default_rng(seed)
    geometry = next((v for v in variations if v in GEOMETRIES and v != "tight"), None)
    height, width, circle = _frame(geometry, size, rng)
    image = _place(photo, source, height, width, circle)
    inside, relative = _disk(height, width, circle)
    if "vignette" in variations:
        image *= np.clip(1.0 - 0.75 * relative**4, 0.15, 1.0)[..., None]
    background = np.zeros(3, np.float32)
    grain = 0.0
    if "tinted" in variations:
        background = rng.uniform(12, 26, 3).astype(np.float32)
        background[rng.integers(3)] += rng.uniform(4, 10)
        grain = 3.0
    canvas = np.empty_like(image)
    canvas[:] = background
    if grain:
        canvas += rng.normal(0, grain, canvas.shape).astype(np.float32)
        ramp = np.linspace(-4, 4, width, dtype=np.float32)[None, :, None]
        canvas += ramp
    image = image * inside[..., None] + canvas * (1 - inside[..., None])
    if "notch" in variations:
        angle = rng.uniform(0, 2 * np.pi)
        side = max(3, round(0.05 * circle.radius))
        x = round(circle.cx + (circle.radius - side / 2) * np.cos(angle))
        y = round(circle.cy + (circle.radius - side / 2) * np.sin(angle))
        image[max(0, y - side) : y + side, max(0, x - side // 2) : x + side // 2] = background
    if "tab" in variations:
        angle = rng.uniform(0, 2 * np.pi)
        side = max(3, round(0.04 * circle.radius))
        x = round(circle.cx + (circle.radius + side) * np.cos(angle))
        y = round(circle.cy + (circle.radius + side) * np.sin(angle))
        image[max(0, y - side) : max(0, y + side), max(0, x - side) : max(0, x + side)] = (210, 210, 200)
    if "text" in variations or "scale_bar" in variations:
        overlay = np.zeros((height, width, 3), np.uint8)
        font = max(0.3, size / 1400)
        thick = max(1, round(size / 700))
        if "text" in variations:
            cv2.putText(
                overlay,
                "OD 2019-03-14 12:31",
                (round(0.01 * width), round(0.05 * height)),
                cv2.FONT_HERSHEY_SIMPLEX,
                font,
                (255, 255, 255),
                thick,
            )
        if "scale_bar" in variations:
            x0, y0 = round(0.84 * width), round(0.95 * height)
            cv2.rectangle(
                overlay, (x0, y0), (x0 + round(0.1 * width), y0 + max(2, thick * 2)), (255, 255, 255), -1
            )
            cv2.putText(
                overlay, "1 mm", (x0, y0 - 4 * thick), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 0), thick
            )
        written = overlay.max(axis=2) > 0
        # Overlays sit outside the field of view, as cameras burn them in.
        written &= inside < 0.01
        image[written] = overlay[written]
    if "haze" in variations:
        image = image * 0.9 + rng.uniform(6, 20)
    if "dark" in variations:
        image = image * rng.uniform(0.3, 0.45)
    if "low_contrast" in variations:
        mean = image[inside > 0.5].mean(axis=0) if (inside > 0.5).any() else image.mean(axis=(0, 1))
        image = mean + (image - mean) * rng.uniform(0.35, 0.5)
    out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if "tight" in variations:
        half = int(circle.radius / np.sqrt(2)) - 1
        cx, cy = round(circle.cx), round(circle.cy)
        out = out[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half]
        circle = None  # type: ignore[assignment]
    if "jpeg30" in variations:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 30])
        assert ok
        out = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    label = name or "photo"
    return ZooCase(f"{label}:{'+'.join(variations) or 'plain'}@{size}", np.ascontiguousarray(out), circle)


def random_variations(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    """``count`` distinct variations, at most one geometry among them."""
    chosen: list[str] = []
    for name in rng.permutation(VARIATIONS):
        if name in GEOMETRIES and any(c in GEOMETRIES for c in chosen):
            continue
        chosen.append(str(name))
        if len(chosen) == count:
            break
    return tuple(chosen)
