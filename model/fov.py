"""Field-of-view geometry of fundus photographs: detect the round FOV, crop it to a square working
image, and map working-size results back onto the original photograph.

Fundus cameras image the retina through a circular aperture. Depending on the camera the circle sits on
a dark or a bright background, may be clipped at the top and bottom of the frame, and may carry burned-in
text outside it. :func:`detect_fov` estimates the circle; :func:`plan_crop` / :func:`to_working` turn any
photograph into a centred, zero-padded ``S×S`` working image (the model's input geometry, 512² by
default) and :func:`from_working` puts a working-size result back at the original size and placement.

Coordinates: pixel centres sit at integer positions, so pixel ``(x, y)`` belongs to the FOV when
``(x - cx)² + (y - cy)² <= r²``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "FovCircle",
    "FovNotFound",
    "SquareCrop",
    "detect_fov",
    "fov_mask",
    "from_working",
    "plan_crop",
    "to_working",
    "working_fov_mask",
]

#: Images are analysed with their longer side reduced to this many pixels (speed; ~0.2 % radius steps).
ANALYSIS_SIZE = 512
#: Smallest image side accepted by :func:`detect_fov`.
MIN_SIDE = 32
#: Local gain bound of the ``transfer`` mapping in :func:`from_working`.
MAX_TRANSFER_GAIN = 4.0
#: Regularisation of the ``transfer`` gain fit (intensity variance on [0, 1]; ~2.5 grey levels std).
TRANSFER_EPS = 1e-4


class FovNotFound(ValueError):
    """The image shows no detectable round fundus field of view."""


@dataclass(frozen=True)
class FovCircle:
    """The FOV circle in original pixel coordinates (pixel centres at integers)."""

    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class SquareCrop:
    """A square box around a FOV circle and the working size it is resampled to.

    ``x0, y0, side`` describe the box in original pixel coordinates; it may extend beyond the
    ``height × width`` image, in which case the outside is zero padding.
    """

    circle: FovCircle
    x0: int
    y0: int
    side: int
    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        """Working pixels per original pixel."""
        return self.size / self.side

    @property
    def working_circle(self) -> FovCircle:
        """The FOV circle in working-image coordinates."""
        s = self.scale
        return FovCircle(
            cx=(self.circle.cx - self.x0 + 0.5) * s - 0.5,
            cy=(self.circle.cy - self.y0 + 0.5) * s - 0.5,
            radius=self.circle.radius * s,
        )


def fov_mask(height: int, width: int, circle: FovCircle) -> np.ndarray:
    """``[H, W]`` bool: pixels whose centre lies inside ``circle``."""
    ys = np.arange(height, dtype=np.float64)[:, None] - circle.cy
    xs = np.arange(width, dtype=np.float64)[None, :] - circle.cx
    return xs * xs + ys * ys <= circle.radius * circle.radius


def _soft_disk(height: int, width: int, circle: FovCircle) -> np.ndarray:
    """``[H, W]`` float32 in [0, 1]: 1 inside, 0 outside, a one-pixel linear ramp across the edge."""
    ys = np.arange(height, dtype=np.float64)[:, None] - circle.cy
    xs = np.arange(width, dtype=np.float64)[None, :] - circle.cx
    distance = np.sqrt(xs * xs + ys * ys)
    return np.clip(circle.radius - distance + 0.5, 0.0, 1.0).astype(np.float32)


def _corner_patches(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    ph, pw = max(2, h // 25), max(2, w // 25)
    return [image[:ph, :pw], image[:ph, -pw:], image[-ph:, :pw], image[-ph:, -pw:]]


def _background(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Background colour and noise level, read from the four corner patches.

    The colour is the median over corners of each corner's median colour, and the noise the median over
    corners of each corner's 95th-percentile deviation from that colour: one corner holding text or a
    piece of the fundus does not move either.
    """
    corners = _corner_patches(image)
    colour = np.median(np.stack([np.median(c.reshape(-1, 3), axis=0) for c in corners]), axis=0)
    spreads = [
        float(np.percentile(np.abs(c.reshape(-1, 3).astype(np.float32) - colour).max(axis=1), 95))
        for c in corners
    ]
    return colour, float(np.median(spreads))


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle (Kåsa) through ``[N, 2]`` points ``(x, y)``."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    rhs = x * x + y * y
    (a, b, c), *_ = np.linalg.lstsq(design, rhs, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(math.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _robust_circle(points: np.ndarray) -> tuple[float, float, float, float]:
    """Circle fit with iterative outlier rejection (notches, eyelashes, glare at the rim).

    Returns:
        ``(cx, cy, r, inlier_fraction)``.
    """
    keep = np.ones(len(points), dtype=bool)
    cx, cy, r = _fit_circle(points)
    for _ in range(5):
        residual = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r)
        spread = max(1.5, 3.0 * float(np.median(residual[keep])) * 1.4826)
        new_keep = residual <= spread
        if new_keep.sum() < 20:
            break
        keep = new_keep
        cx, cy, r = _fit_circle(points[keep])
    residual = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r)
    return cx, cy, r, float(np.mean(residual <= max(2.0, 0.03 * r)))


def _foreground(small: np.ndarray) -> np.ndarray:
    """``[h, w]`` uint8 0/255: pixels that differ from the background colour (the fundus candidate)."""
    smooth = cv2.medianBlur(small, 5)
    background, noise = _background(smooth)
    difference = np.abs(smooth.astype(np.float32) - background.astype(np.float32)).max(axis=2)
    # Just above the background's own noise, so the dim, vignetted rim of the fundus stays inside.
    threshold = max(10.0, noise + 8.0)
    return (difference > threshold).astype(np.uint8) * 255


def _fundus_region(binary: np.ndarray) -> np.ndarray:
    h, w = binary.shape
    k = max(3, (min(h, w) // 60) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    cleaned = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(cleaned, connectivity=8)
    if count <= 1:
        return np.zeros_like(binary)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = (labels == largest).astype(np.uint8) * 255
    # The field of view is convex: its hull bridges dark bites at the rim (vignetting, shadows) and
    # notches, which would otherwise pull the circle fit.
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    filled = np.zeros_like(component)
    cv2.fillConvexPoly(filled, hull, 255)
    return filled


def detect_fov(image: np.ndarray) -> FovCircle:
    """Find the circular field of view of a colour fundus photograph.

    The photograph is reduced to :data:`ANALYSIS_SIZE`, the background colour is read from the corners
    (dark or bright backgrounds both work), the fundus is the largest region that differs from it, and a
    robust circle is fitted to that region's outline, ignoring outline points on the image border (where
    the circle is clipped by the frame).

    Args:
        image: ``[H, W, 3]`` uint8 RGB.

    Returns:
        The FOV circle in original pixel coordinates.

    Raises:
        FovNotFound: tiny or uniform images, or no region that is convincingly a (clipped) disk.
        ValueError: not an ``[H, W, 3]`` uint8 array.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("detect_fov expects an [H, W, 3] uint8 RGB array")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise FovNotFound(f"image too small for FOV detection ({width}x{height}, minimum side {MIN_SIDE})")
    factor = min(1.0, ANALYSIS_SIZE / max(height, width))
    small = image
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    region = _fundus_region(_foreground(small))
    area = int(np.count_nonzero(region))
    if area < 0.05 * sh * sw:
        raise FovNotFound("no fundus field of view found (no large region differs from the background)")

    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    on_border = (
        (outline[:, 0] <= 1) | (outline[:, 0] >= sw - 2) | (outline[:, 1] <= 1) | (outline[:, 1] >= sh - 2)
    )
    rim = outline[~on_border]
    if len(rim) < 30:
        raise FovNotFound("no fundus field of view found (the region has no round outline)")
    cx, cy, r, inliers = _robust_circle(rim)
    residual = np.abs(np.hypot(rim[:, 0] - cx, rim[:, 1] - cy) - r)
    angles = np.arctan2(
        rim[residual <= max(2.0, 0.03 * r), 1] - cy, rim[residual <= max(2.0, 0.03 * r), 0] - cx
    )
    arc_bins = len(np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36).astype(int)))

    disk = fov_mask(sh, sw, FovCircle(cx, cy, r))
    inside = region > 0
    union = np.count_nonzero(disk | inside)
    iou = np.count_nonzero(disk & inside) / union if union else 0.0
    plausible = (
        inliers >= 0.3
        and arc_bins >= 12
        and iou >= 0.85
        and 0.15 * min(sh, sw) <= r <= 0.8 * max(sh, sw)
        and -0.25 * r <= cx <= sw + 0.25 * r
        and -0.25 * r <= cy <= sh + 0.25 * r
    )
    if not plausible:
        raise FovNotFound("no fundus field of view found (the candidate region is not a disk)")
    # The low threshold admits the partly covered pixels of the anti-aliased rim and the hull adds a
    # little, so the outline sits about half an analysis pixel outside the edge (calibrated on the HRF
    # FOV masks: mean IoU 0.997 → 0.998).
    return FovCircle(
        cx=(cx + 0.5) / factor - 0.5, cy=(cy + 0.5) / factor - 0.5, radius=max(r - 0.5, 1.0) / factor
    )


def plan_crop(circle: FovCircle, height: int, width: int, working_size: int = 512) -> SquareCrop:
    """The square box (original coordinates) that holds the FOV circle, to be resampled to ``working_size``.

    The box is the circle's bounding square plus one pixel on each side, centred on the circle.
    """
    if working_size < 8:
        raise ValueError(f"working size must be at least 8, got {working_size}")
    if circle.radius <= 0:
        raise ValueError("circle radius must be positive")
    side = max(2, math.ceil(2 * circle.radius) + 2)
    x0 = round(circle.cx - (side - 1) / 2)
    y0 = round(circle.cy - (side - 1) / 2)
    return SquareCrop(circle=circle, x0=x0, y0=y0, side=side, height=height, width=width, size=working_size)


def _extract_box(image: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """The ``side × side`` box of ``image``, zero-padded where it leaves the image."""
    h, w = image.shape[:2]
    box = np.zeros((crop.side, crop.side, *image.shape[2:]), dtype=image.dtype)
    sx0, sy0 = max(crop.x0, 0), max(crop.y0, 0)
    sx1, sy1 = min(crop.x0 + crop.side, w), min(crop.y0 + crop.side, h)
    if sx1 > sx0 and sy1 > sy0:
        box[sy0 - crop.y0 : sy1 - crop.y0, sx0 - crop.x0 : sx1 - crop.x0] = image[sy0:sy1, sx0:sx1]
    return box


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interpolation)
    return out.reshape(size, size, *image.shape[2:])


def to_working(image: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """Crop, zero-pad and resample ``image`` ``[H, W, C]`` uint8 to the ``[S, S, C]`` working image.

    Pixels outside the FOV circle are set to 0 (this also removes burned-in text outside the FOV).
    """
    if image.shape[:2] != (crop.height, crop.width):
        raise ValueError(f"image is {image.shape[:2]}, the crop was planned for {(crop.height, crop.width)}")
    squeeze = image.ndim == 2
    working = _resize(_extract_box(image[..., None] if squeeze else image, crop), crop.size)
    if working.ndim == 2:
        working = working[..., None]
    inside = fov_mask(crop.size, crop.size, crop.working_circle)
    working = working * inside[..., None].astype(working.dtype)
    return working[..., 0] if squeeze else working


def _frame_coverage(start: int, length: int, side: int, size: int) -> np.ndarray:
    """``[size]`` float32: fraction of each working pixel (one axis) that lies inside the original frame."""
    inside = np.zeros((1, side), dtype=np.float32)
    lo, hi = max(0, -start), min(side, length - start)
    if hi > lo:
        inside[0, lo:hi] = 1.0
    interpolation = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    return cv2.resize(inside, (size, 1), interpolation=interpolation)[0]


def working_fov_mask(crop: SquareCrop) -> np.ndarray:
    """``[S, S]`` float32 FOV mask of the working image, soft at the edge.

    It is the FOV circle intersected with the original frame: where the camera clipped the circle (top
    and bottom of many photographs) the zero padding is not part of the field of view.
    """
    rows = _frame_coverage(crop.y0, crop.height, crop.side, crop.size)
    cols = _frame_coverage(crop.x0, crop.width, crop.side, crop.size)
    return _soft_disk(crop.size, crop.size, crop.working_circle) * np.outer(rows, cols)


def _upsample_to_box(values: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """Resample a working-size ``[S, S, C]`` float array to the ``[side, side, C]`` original box."""
    interpolation = cv2.INTER_AREA if crop.side < crop.size else cv2.INTER_LINEAR
    out = cv2.resize(values, (crop.side, crop.side), interpolation=interpolation)
    return out.reshape(crop.side, crop.side, -1)


def _paste_box(box: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """Place a ``[side, side, C]`` box into an ``[H, W, C]`` zero canvas, clipping at the image border."""
    canvas = np.zeros((crop.height, crop.width, box.shape[2]), dtype=box.dtype)
    sx0, sy0 = max(crop.x0, 0), max(crop.y0, 0)
    sx1, sy1 = min(crop.x0 + crop.side, crop.width), min(crop.y0 + crop.side, crop.height)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0:sy1, sx0:sx1] = box[sy0 - crop.y0 : sy1 - crop.y0, sx0 - crop.x0 : sx1 - crop.x0]
    return canvas


def _box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    return cv2.blur(x, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT).reshape(x.shape)


def _local_linear_correction(
    source: np.ndarray, target: np.ndarray, radius: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel local gain and offset mapping ``source`` to ``target`` (guided-filter coefficients).

    Both arrays are ``[S, S, C]`` float32 in [0, 1]; returns smoothed ``(gain, offset)`` of that shape.
    """
    mean_s = _box_mean(source, radius)
    mean_t = _box_mean(target, radius)
    cov = _box_mean(source * target, radius) - mean_s * mean_t
    var = _box_mean(source * source, radius) - mean_s * mean_s
    gain = cov / (var + eps)
    offset = mean_t - gain * mean_s
    # Bound the gain so flat, noisy windows cannot amplify native noise without limit; the caller adds
    # back whatever the bounded model misses at working size, so the result there stays exact.
    return np.clip(_box_mean(gain, radius), 0.0, MAX_TRANSFER_GAIN), _box_mean(offset, radius)


def from_working(
    result: np.ndarray,
    crop: SquareCrop,
    original: np.ndarray,
    *,
    working_input: np.ndarray | None = None,
    method: Literal["transfer", "resize"] = "transfer",
) -> np.ndarray:
    """Map a working-size result back onto the original photograph's geometry.

    Args:
        result: ``[S, S, C]`` uint8 model output in working geometry (``[S, S]`` or one channel for
            single-channel maps such as vessel probabilities, which always use ``resize``).
        crop: the crop that produced the working image.
        original: ``[H, W, C]`` uint8 original photograph (``C`` = result channels for ``resize``).
        working_input: ``[S, S, C]`` uint8 working image the result was computed from; recomputed with
            :func:`to_working` when omitted (``transfer`` only).
        method: ``"resize"`` upsamples the result; ``"transfer"`` carries the enhancement over to native
            resolution: a local gain and offset (guided-filter coefficients, fitted between
            ``working_input`` and ``result`` in 17×17 windows at 512²) are upsampled and applied to the
            native original, and whatever that local model misses at working size is added as an
            upsampled residual. Native detail finer than the working grid survives, with the local
            gain applied to it, while the result is reproduced exactly at working resolution.

    Returns:
        ``[H, W, C]`` uint8 (or ``[H, W]`` for a 2-D result): the same size and FOV placement as
        ``original``; outside the FOV the original pixels are kept (zeros for a single-channel result
        over a colour original).
    """
    if method not in ("transfer", "resize"):
        raise ValueError(f"unknown mapping method {method!r}; expected 'transfer' or 'resize'")
    if original.shape[:2] != (crop.height, crop.width):
        raise ValueError(
            f"original is {original.shape[:2]}, the crop was planned for {(crop.height, crop.width)}"
        )
    if result.shape[:2] != (crop.size, crop.size):
        raise ValueError(f"result is {result.shape[:2]}, expected the working size {crop.size}")
    flat = result.ndim == 2
    res = (result[..., None] if flat else result).astype(np.float32) / 255.0
    channels = res.shape[2]
    native_mask = _soft_disk(crop.height, crop.width, crop.circle)[..., None]

    if channels == 1 or method == "resize" or original.ndim != 3 or original.shape[2] != channels:
        mapped = _paste_box(_upsample_to_box(res, crop), crop)
        if original.ndim == 3 and original.shape[2] == channels:
            base = original.astype(np.float32) / 255.0
        else:
            base = np.zeros_like(mapped)
        out = base * (1 - native_mask) + mapped * native_mask
    else:
        if working_input is None:
            working_input = to_working(original, crop)
        if working_input.shape != result.shape:
            raise ValueError(f"working_input is {working_input.shape}, result is {result.shape}")
        src = working_input.astype(np.float32) / 255.0
        radius = max(2, round(8 * crop.size / 512))
        gain, offset = _local_linear_correction(src, res, radius, eps=TRANSFER_EPS)
        leftover = res - (gain * src + offset)
        gain_n = _paste_box(_upsample_to_box(gain, crop), crop)
        rest_n = _paste_box(_upsample_to_box(offset + leftover, crop), crop)
        native = original.astype(np.float32) / 255.0
        enhanced = gain_n * native + rest_n
        out = native * (1 - native_mask) + enhanced * native_mask
    out8 = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return out8[..., 0] if flat else out8
