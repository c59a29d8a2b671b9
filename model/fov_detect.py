"""Field-of-view estimation for fundus photographs from any camera, and refusal of non-fundus images.

Fundus cameras image the retina through a circular aperture, but what reaches a hospital service
varies: the circle may be clipped on any side by the frame, carry notches or marker tabs, sit on a
black, grey, tinted or hazy background, be darkened towards the rim by vignetting, be JPEG-blocky,
or have been cropped so tightly that no background is left. :func:`estimate_fov` handles all of them:

1. The photograph is reduced to :data:`ANALYSIS_SIZE` (strided sampling, then area averaging).
2. The background colour and noise come from the four corners; each pixel's difference from that
   colour is thresholded just above the noise, and the largest region (hole-filled, convex hull) is
   the candidate field of view.
3. Its outline, minus the parts on the frame border (where the camera clipped the circle), is moved
   to the strongest radial step of the difference image nearby (the aperture edge, not where a
   vignetted rim happens to cross the threshold), and a circle is fitted by RANSAC: notches, tabs,
   text touching the rim and hull chords are outliers.
4. Confidence = the share of the visible rim the inliers cover × the inlier share × the overlap of
   the fitted disk with the region. A confident fit is ``fitted``. Otherwise, if the image still
   looks like a fundus photograph (fundus colours, some structure, not noise), the FOV falls back
   to the bright region, or to the whole frame when there is no background (``fallback``). Only
   images that are clearly not fundus photographs raise :class:`NotFundus`.

The estimate also carries the *photographed area*: the pixels inside the fitted circle that differ
from the background. Results are blended into the input with it, so that where the circle runs past
the picture (elliptical or clipped fields) the answer keeps the input's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from model.fov import FovCircle, FovNotFound, soft_disk

__all__ = [
    "ANALYSIS_SIZE",
    "FovEstimate",
    "FovMethod",
    "NotFundus",
    "detect_fov",
    "estimate_fov",
    "full_frame_estimate",
]

#: Longer side of the analysis copy (pixels): ~0.3 % of the width per pixel, a few ms per image.
ANALYSIS_SIZE = 384
#: Smallest image side accepted.
MIN_SIDE = 32
#: A fit is ``fitted`` at or above this confidence.
FIT_CONFIDENCE = 0.5
#: RANSAC iterations of the circle fit.
RANSAC_TRIALS = 160
#: Candidate circles scored together (see :func:`_count_on_circles`).
CIRCLES_PER_BLOCK = 32

FovMethod = Literal["fitted", "fallback", "full"]


class NotFundus(FovNotFound):
    """The image is clearly not a fundus photograph (flat, noise, text, a natural photograph)."""


@dataclass(frozen=True)
class FovEstimate:
    """Where the field of view of a photograph is.

    Attributes:
        circle: the FOV circle in original pixel coordinates; for a fallback, the circle around the
            bright region or the whole frame (it drives the square working crop).
        method: ``fitted`` (the rim was found), ``fallback`` (uncertain: the bright region or the
            whole frame) or ``full`` (the caller asked to skip detection).
        confidence: 0–1, how well a circle explains the visible rim (0 for ``full``).
        height, width: the photograph's size.
        area: ``[h, w]`` float32 in [0, 1] at analysis resolution: the photographed part of the
            frame (None = the whole frame). Results are blended into the input inside it.
        scale: analysis pixels per original pixel.
    """

    circle: FovCircle
    method: FovMethod
    confidence: float
    height: int
    width: int
    area: np.ndarray | None = field(default=None, repr=False, compare=False)
    scale: float = 1.0

    def area_weight(self, rows: slice, cols: slice) -> np.ndarray | None:
        """``[h, w]`` float32 photographed-area weight over original pixels ``[rows, cols]``; None
        when the whole field of view is picture."""
        h = rows.stop - rows.start
        w = cols.stop - cols.start
        if self.area is None:
            return None
        if h <= 0 or w <= 0:
            return np.zeros((max(h, 0), max(w, 0)), dtype=np.float32)
        # Map the original-pixel box onto the analysis grid (pixel centres) and resample that part.
        s = self.scale
        x0, x1 = (cols.start + 0.5) * s - 0.5, (cols.stop - 0.5) * s - 0.5
        y0, y1 = (rows.start + 0.5) * s - 0.5, (rows.stop - 0.5) * s - 0.5
        xs = np.linspace(x0, x1, w, dtype=np.float32)
        ys = np.linspace(y0, y1, h, dtype=np.float32)
        map_x = np.broadcast_to(xs[None, :], (h, w))
        map_y = np.broadcast_to(ys[:, None], (h, w))
        return cv2.remap(
            self.area,
            np.ascontiguousarray(map_x),
            np.ascontiguousarray(map_y),
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def mask(self) -> np.ndarray:
        """``[H, W]`` float32 in [0, 1]: the field of view over the whole photograph (soft rim)."""
        weight = soft_disk(self.height, self.width, self.circle)
        picture = self.area_weight(slice(0, self.height), slice(0, self.width))
        if picture is not None:
            weight *= picture
        return weight


def full_frame_estimate(height: int, width: int, method: FovMethod = "full") -> FovEstimate:
    """The whole frame as the field of view (the circle through the four corners)."""
    circle = FovCircle(cx=(width - 1) / 2, cy=(height - 1) / 2, radius=math.hypot(width, height) / 2)
    return FovEstimate(circle=circle, method=method, confidence=0.0, height=height, width=width)


# ----------------------------------------------------------------------------- analysis copy
def _analysis_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``(small, scale)``: the image with its longer side at :data:`ANALYSIS_SIZE`.

    Smaller images are enlarged, so that texture measures (edge density) mean the same at any size.
    """
    height, width = image.shape[:2]
    factor = ANALYSIS_SIZE / max(height, width)
    if factor == 1.0:
        return image, 1.0
    if factor > 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), size[0] / width
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    source = image
    if factor < 0.25:
        # Point sampling to about twice the target first (cheap), then exact area averaging.
        source = cv2.resize(image, (2 * size[0], 2 * size[1]), interpolation=cv2.INTER_NEAREST)
    small = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
    # Effective scale of the analysis grid (x and y agree to rounding).
    return small, size[0] / width


def _corner_patches(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    ph, pw = max(2, h // 20), max(2, w // 20)
    return [image[:ph, :pw], image[:ph, -pw:], image[-ph:, :pw], image[-ph:, -pw:]]


def _background(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Background colour and noise from the corners (robust to one corner holding text or fundus)."""
    # The four patches have one shape: one median and one percentile call for all of them (the
    # same numbers as patch by patch, with a fraction of the small calls under the GIL).
    corners = np.stack([patch.reshape(-1, 3) for patch in _corner_patches(image)])  # [4, N, 3]
    colour = np.median(np.median(corners, axis=1), axis=0)
    spread = np.abs(corners.astype(np.float32) - colour).max(axis=2)  # [4, N]
    return colour, float(np.median(np.percentile(spread, 90, axis=1)))


def _has_background(image: np.ndarray) -> bool:
    """Whether at least two corners show background: dark, or neutral (grey or white), not fundus."""
    count = 0
    for patch in _corner_patches(image):
        colour = np.median(patch.reshape(-1, 3), axis=0)
        dark = colour.max() <= 40
        neutral = colour.max() - colour.min() <= 20
        count += int(dark or neutral)
    return count >= 2


def _difference(smooth: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``[h, w]`` uint8: per pixel, the largest channel difference from the background colour."""
    # A scalar operand: no image-sized copy of the colour to build (that was three quarters of the time).
    reference = tuple(float(v) for v in np.clip(np.round(colour), 0, 255).astype(np.uint8))
    red, green, blue = cv2.split(cv2.absdiff(smooth, (*reference, 0.0)))
    return cv2.max(cv2.max(red, green), blue)


def _percentile_u8(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear method) of a uint8 array, read off its histogram.

    The same number as numpy's, in the same float64 arithmetic, without sorting a copy (a tenth of
    the time on the analysis grid).
    """
    counts = cv2.calcHist([np.ascontiguousarray(values)], [0], None, [256], [0, 256]).ravel()
    cumulative = np.cumsum(counts)
    n = values.size
    quantile = q / 100
    virtual = (n - 1) * quantile  # numpy's "virtual index" of the linear method

    def ranked(index: int) -> int:  # the index-th smallest value (0-based)
        return int(np.searchsorted(cumulative, index, side="right"))

    if virtual >= n - 1:
        return float(ranked(n - 1))
    below = math.floor(virtual)
    a, b = ranked(below), ranked(below + 1)
    t = virtual - below
    return float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t)


def _largest_region(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(component, hull)``: the largest 8-connected component after a small open/close (uint8
    0/255, holes filled) and its filled convex hull."""
    h, w = binary.shape
    k = max(3, (min(h, w) // 60) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    cleaned = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, kernel)
    count, labels = cv2.connectedComponents(cleaned, connectivity=8)
    if count <= 1:
        empty = np.zeros_like(binary)
        return empty, empty
    areas = np.bincount(labels.ravel(), minlength=count)
    largest = 1 + int(np.argmax(areas[1:]))
    component = cv2.compare(labels, largest, cv2.CMP_EQ)
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    solid = np.zeros_like(component)
    cv2.drawContours(solid, contours, -1, 255, thickness=cv2.FILLED)
    filled = np.zeros_like(component)
    cv2.fillConvexPoly(filled, cv2.convexHull(np.concatenate(contours)), 255)
    return solid, filled


# ----------------------------------------------------------------------------- circle fitting
def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle (Kåsa) through ``[N, 2]`` points ``(x, y)``."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(math.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _tolerance(r: np.ndarray | float) -> np.ndarray | float:
    """Inlier distance for a circle of radius ``r`` (analysis pixels): 1.5 % of it, 1 to 5 pixels."""
    return np.clip(0.015 * np.asarray(r), 1.0, 5.0)


def _count_on_circles(
    points: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, tolerance: np.ndarray
) -> np.ndarray:
    """``[T]``: how many of ``points`` ``[N, 2]`` lie within ``tolerance`` of each of T circles.

    ``|d − r| ≤ t`` is tested as ``max(r − t, 0)² ≤ d² ≤ (r + t)²``: the same test without a square
    root per point and circle (the bulk of the circle fit's time). Circles are taken
    :data:`CIRCLES_PER_BLOCK` at a time, so the ``[block, N]`` temporaries stay in the CPU cache
    (about 2.5 times faster than all at once, with the same counts).
    """
    counts = np.empty(len(cx), dtype=np.intp)
    with np.errstate(invalid="ignore", over="ignore"):
        low = np.square(np.maximum(r - tolerance, 0.0))
        high = np.square(r + tolerance)
        for start in range(0, len(cx), CIRCLES_PER_BLOCK):
            block = slice(start, start + CIRCLES_PER_BLOCK)
            squared = np.subtract(points[None, :, 0], cx[block, None])
            np.multiply(squared, squared, out=squared)
            dy = np.subtract(points[None, :, 1], cy[block, None])
            np.multiply(dy, dy, out=dy)
            squared += dy
            inside = np.greater_equal(squared, low[block, None])
            inside &= np.less_equal(squared, high[block, None], out=np.empty_like(inside))
            counts[block] = np.count_nonzero(inside, axis=1)
    return counts


def _ransac_circle(
    points: np.ndarray, rng: np.random.Generator, max_radius: float
) -> tuple[float, float, float, np.ndarray]:
    """Circle with the most inliers among circles through random point triples, refined on them.

    Circles larger than ``max_radius`` are not candidates (nearly collinear triples give huge ones
    that pass through any stretch of outline). Returns ``(cx, cy, r, inlier mask)``.
    """
    n = len(points)
    triples = rng.integers(0, n, size=(RANSAC_TRIALS, 3))
    p1, p2, p3 = points[triples[:, 0]], points[triples[:, 1]], points[triples[:, 2]]
    # Circumcentre of each triple.
    ax, ay = p1[:, 0], p1[:, 1]
    bx, by = p2[:, 0], p2[:, 1]
    qx, qy = p3[:, 0], p3[:, 1]
    d = 2.0 * (ax * (by - qy) + bx * (qy - ay) + qx * (ay - by))
    valid = np.abs(d) > 1e-6
    d = np.where(valid, d, 1.0)
    a2, b2, q2 = ax * ax + ay * ay, bx * bx + by * by, qx * qx + qy * qy
    cx = (a2 * (by - qy) + b2 * (qy - ay) + q2 * (ay - by)) / d
    cy = (a2 * (qx - bx) + b2 * (ax - qx) + q2 * (bx - ax)) / d
    r = np.hypot(ax - cx, ay - cy)
    tolerance = _tolerance(r)
    valid &= r <= max_radius
    # Counted in float32: half the memory traffic of the fit's costliest step; analysis coordinates
    # (< 1,000 pixels) keep about four decimals, far below the 1-pixel tolerance.
    single = [np.asarray(v, dtype=np.float32) for v in (points, cx, cy, r, tolerance)]
    counts = np.where(valid, _count_on_circles(*single), -1)
    best = int(np.argmax(counts))
    fx, fy, fr = float(cx[best]), float(cy[best]), float(r[best])
    inliers = np.abs(np.hypot(points[:, 0] - fx, points[:, 1] - fy) - fr) <= tolerance[best]
    # Least-squares refits on the inliers, kept only while they do not lose inliers (an algebraic
    # fit of a short arc can drift off it).
    for _ in range(3):
        if inliers.sum() < 3:
            break
        gx, gy, gr = _fit_circle(points[inliers])
        refit = np.abs(np.hypot(points[:, 0] - gx, points[:, 1] - gy) - gr) <= _tolerance(gr)
        if refit.sum() < inliers.sum() or gr > max_radius:
            break
        fx, fy, fr, inliers = gx, gy, gr, refit
    return fx, fy, fr, inliers


def _radial_profiles(
    points: np.ndarray, centre: tuple[float, float], blurred: np.ndarray, reach: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples of ``blurred`` along the ray from ``centre`` through each point, one pixel apart.

    Returns ``(profiles [N, S], offsets [S], unit directions [N, 2])``; offsets run from ``-reach``
    (inside) to ``+reach`` (outside).
    """
    direction = points - np.asarray(centre)[None, :]
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
    offsets = np.arange(-reach, reach + 1.0, 1.0, dtype=np.float32)
    xs = (points[:, None, 0] + offsets[None, :] * direction[:, None, 0]).astype(np.float32)
    ys = (points[:, None, 1] + offsets[None, :] * direction[:, None, 1]).astype(np.float32)
    profile = cv2.remap(blurred, xs, ys, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return profile, offsets, direction


def _rim_sharpness(points: np.ndarray, cx: float, cy: float, r: float, blurred: np.ndarray) -> float:
    """How abrupt the rim is: median over rim points of the steepest one-pixel drop near the circle
    over the whole drop from 4 % of the radius inside to 4 % outside.

    An aperture edge drops within a few pixels (about 0.2–0.5 here); the gradual darkening of
    vignetting, which can look just as round, spreads over many (below 0.1).
    """
    if len(points) == 0:
        return 0.0
    angles = np.arctan2(points[:, 1] - cy, points[:, 0] - cx)
    on_circle = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
    reach = max(4.0, 0.04 * r)
    profile, offsets, _ = _radial_profiles(on_circle, (cx, cy), blurred, reach)
    total = profile[:, 0] - profile[:, -1]
    drop = profile[:, :-1] - profile[:, 1:]
    near = np.abs(offsets[:-1] + 0.5) <= 3.0
    steepest = drop[:, near].max(axis=1)
    # A rim without a real drop across it (< 3 grey levels) is no evidence at all.
    ratio = np.where(total >= 3.0, np.minimum(steepest / np.maximum(total, 1.0), 1.0), 0.0)
    return float(np.median(ratio))


def _refine_to_edges(
    points: np.ndarray, centre: tuple[float, float], blurred: np.ndarray, reach: float
) -> np.ndarray:
    """Move each outline point along its ray from ``centre`` to the strongest inside→outside step.

    The step is the largest drop of the (blurred) difference image over one pixel within ``reach``
    pixels on either side; with vignetting the threshold crosses the dim rim too early, the aperture
    edge is where the drop is steepest. ``[N, 2]`` → ``[N, 2]`` float.
    """
    profile, offsets, direction = _radial_profiles(points, centre, blurred, reach)
    drop = profile[:, :-1] - profile[:, 1:]  # positive where the value falls going outwards
    step = np.argmax(drop, axis=1)
    shift = offsets[step] + 0.5
    return points + shift[:, None] * direction


#: An axis-aligned straight stretch of outline at least this share of the image side long is a frame
#: edge (a circle clipped by an earlier frame, then padded), not rim: the arc of a circle stays on one
#: pixel row for only about 2·√r pixels.
STRAIGHT_RUN = 0.15


def _straight_runs(contour: np.ndarray, length: int) -> np.ndarray:
    """``[N]`` bool: points of an ordered ``[N, 2]`` contour on a horizontal or vertical run of at
    least ``length`` points."""
    marked = np.zeros(len(contour), dtype=bool)
    for axis in (0, 1):
        values = contour[:, axis]
        change = np.flatnonzero(np.diff(values) != 0) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(values)]])
        for start, end in zip(starts, ends, strict=True):
            if end - start >= length:
                marked[start:end] = True
    return marked


def _angle_bins(points: np.ndarray, cx: float, cy: float, bins: int) -> np.ndarray:
    """``[bins]`` bool: angular bins (from angle 0) around ``(cx, cy)`` that hold any of ``points``."""
    hit = np.zeros(bins, dtype=bool)
    if len(points):
        angles = np.mod(np.arctan2(points[:, 1] - cy, points[:, 0] - cx), 2 * np.pi)
        hit[np.floor(angles / (2 * np.pi) * bins).astype(int) % bins] = True
    return hit


def _visible_rim_bins(cx: float, cy: float, r: float, width: int, height: int, bins: int) -> np.ndarray:
    """``[bins]`` bool: angular bins of the circle that lie inside the frame (not clipped)."""
    angles = (np.arange(bins) + 0.5) * (2 * np.pi / bins)
    x = cx + r * np.cos(angles)
    y = cy + r * np.sin(angles)
    return (x > 1.5) & (x < width - 2.5) & (y > 1.5) & (y < height - 2.5)


@dataclass
class _Fit:
    """A fitted rim (analysis pixels) and how well it is supported.

    Attributes:
        coverage: share of the visible rim (72 angular bins) that inliers cover.
        inlier_share: share of the outline points on the circle.
        precision: share of the candidate region inside the fitted disk.
    """

    cx: float
    cy: float
    r: float
    confidence: float
    plausible: bool
    coverage: float
    inlier_share: float
    precision: float
    sharpness: float


def _fit_rim(
    component: np.ndarray, region: np.ndarray, difference: np.ndarray, rng: np.random.Generator
) -> _Fit | None:
    """Fit the FOV circle to the component's outline (see the module docstring, steps 3–4).

    The outline of the component itself, not of its hull: a hull bridges a marker tab to the rim
    with chords that hide a whole stretch of the arc. ``region`` (the hull) is what the fitted disk
    must overlap.
    """
    h, w = region.shape
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    outline = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    on_border = (
        (outline[:, 0] <= 1) | (outline[:, 0] >= w - 2) | (outline[:, 1] <= 1) | (outline[:, 1] >= h - 2)
    )
    straight = np.concatenate(
        [_straight_runs(c.reshape(-1, 2), round(STRAIGHT_RUN * max(h, w))) for c in contours]
    )
    rim = outline[~(on_border | straight)]
    if len(rim) < 20:
        return None
    moments = cv2.moments(region, binaryImage=True)
    if moments["m00"] <= 0:
        return None
    centre = (moments["m10"] / moments["m00"], moments["m01"] / moments["m00"])
    # A first fit gives the centre the rays start from; refine, then fit again.
    max_radius = 1.5 * max(h, w)
    cx, cy, r, _ = _ransac_circle(rim, rng, max_radius)
    if not (0 < r < 4 * max(h, w)):
        cx, cy = centre
        r = math.sqrt(moments["m00"] / math.pi)
    blurred = cv2.GaussianBlur(difference.astype(np.float32), (0, 0), 1.0)
    refined = _refine_to_edges(rim, (cx, cy), blurred, reach=max(2.0, 0.05 * r))
    keep = (refined[:, 0] > 1) & (refined[:, 0] < w - 2) & (refined[:, 1] > 1) & (refined[:, 1] < h - 2)
    refined = refined[keep]
    if len(refined) < 20:
        return None
    cx, cy, r, inliers = _ransac_circle(refined, rng, max_radius)
    bins = 72
    # The rim is visible where the circle is inside the frame and no straight frame edge cuts it.
    in_frame = _visible_rim_bins(cx, cy, r, w, h, bins)
    visible = in_frame & ~_angle_bins(outline[straight], cx, cy, bins)
    if not visible.any():
        return None
    hit = _angle_bins(refined[inliers], cx, cy, bins)
    coverage = float((hit & visible).sum() / visible.sum())
    inlier_share = float(inliers.mean())
    disk = np.zeros_like(region)
    cv2.circle(disk, (round(cx * 16), round(cy * 16)), round(r * 16), 255, -1, lineType=cv2.LINE_8, shift=4)
    inside = region > 0
    both = np.count_nonzero((disk > 0) & inside)
    # The region must lie within the disk (precision) and fill much of it (a letterboxed or
    # source-clipped circle leaves caps of the disk empty, so recall is only loosely required).
    precision = both / max(np.count_nonzero(inside), 1)
    recall = both / max(np.count_nonzero(disk), 1)
    # Full marks from 70 % of the visible rim and 50 % of the outline (notches, tabs, chords and
    # text are the rest).
    confidence = (
        min(1.0, coverage / 0.7)
        * min(1.0, inlier_share / 0.5)
        * min(1.0, max(0.0, (precision - 0.8) / 0.15))
        * (1.0 if recall >= 0.4 else 0.0)
    )
    plausible = (
        0.2 * min(h, w) <= r <= 0.9 * max(h, w)
        and -0.3 * r <= cx <= w + 0.3 * r
        and -0.3 * r <= cy <= h + 0.3 * r
        and in_frame.mean() >= 0.25
    )
    # A soft, vignetting-like "rim" is not an aperture edge: full marks from a sharpness of 0.22.
    sharpness = _rim_sharpness(refined[inliers], cx, cy, r, blurred)
    confidence *= min(1.0, max(0.0, (sharpness - 0.12) / 0.1))
    return _Fit(cx, cy, r, confidence, plausible, coverage, inlier_share, precision, sharpness)


# ----------------------------------------------------------------------------- fundus or not
@dataclass
class _Looks:
    """Appearance statistics of the candidate area.

    Attributes:
        fundus_share: share of its pixels with fundus colours (red to yellow hues, saturated, lit).
        foreign_share: share of clearly coloured pixels (saturated and lit) of green to blue hues,
            which a fundus photograph does not have and scenes, logos and stains do.
        monochrome: channels agree (red-free or grey captures).
        flat: almost no variation.
        noisy: most of the variation is pixel-to-pixel (random noise).
        edge_share: share of its pixels on strong (high-contrast) luminance edges. A fundus is
            smooth shading with thin, low-contrast vessels; fur, objects, faces and scenes have many
            more (see :data:`FALLBACK_EDGE_SHARE`). None when not measured: a fitted rim does not
            need it, and it is a quarter of the appearance test's time.
    """

    fundus_share: float
    foreign_share: float
    monochrome: bool
    flat: bool
    noisy: bool
    edge_share: float | None


#: Hues of fundus colours on OpenCV's 0–180 scale: red through orange and yellow to yellow-green
#: (−24° to 90°; some cameras render the retina yellowish).
FUNDUS_HUE_MAX = 45
FUNDUS_HUE_WRAP = 168
#: Minimum saturation / value (0–255) of a fundus-coloured pixel.
FUNDUS_MIN_SATURATION = 45
FUNDUS_MIN_VALUE = 8
#: Green to blue hues (92°–270°): a fundus photograph has almost none (purple and magenta casts of
#: flash and haze do occur, so they are not counted).
FOREIGN_HUE_MAX = 135
#: Saturation / value (0–255) of a clearly coloured pixel, and the most clearly coloured pixels of
#: green to blue hues a fundus photograph may have.
FOREIGN_MIN_SATURATION = 60
FOREIGN_MIN_VALUE = 40
MAX_FOREIGN_SHARE = 0.1


def _appearance(small: np.ndarray, mask: np.ndarray, *, edges: bool) -> _Looks:
    """Whether the pixels under ``mask`` (uint8 0/255) look like a fundus photograph.

    ``edges`` measures :attr:`_Looks.edge_share` too.

    A fundus is red to yellow and saturated almost everywhere (the retina seen through the pupil),
    which documents, screenshots, sky, foliage, grey or white objects and most scenes are not.
    Its variation is smooth shading plus thin vessels, not pixel-to-pixel noise.
    """
    # Away from the area's own outline: the rim of a field of view is an edge of the frame, not of
    # the picture, and its blurred band is not variation of the picture either.
    size = max(9, round(0.04 * max(small.shape[:2])) | 1)
    core = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    if cv2.countNonZero(core) >= 50:
        mask = core
    count = cv2.countNonZero(mask)
    if count < 50:
        return _Looks(0.0, 1.0, False, True, False, 1.0)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    low = (0, FUNDUS_MIN_SATURATION, FUNDUS_MIN_VALUE)
    coloured = cv2.bitwise_or(
        cv2.inRange(hsv, low, (FUNDUS_HUE_MAX, 255, 255)),
        cv2.inRange(hsv, (FUNDUS_HUE_WRAP, *low[1:]), (180, 255, 255)),
    )
    fundus_share = cv2.countNonZero(cv2.bitwise_and(coloured, mask)) / count
    vivid = cv2.inRange(
        hsv, (FUNDUS_HUE_MAX + 1, FOREIGN_MIN_SATURATION, FOREIGN_MIN_VALUE), (FOREIGN_HUE_MAX, 255, 255)
    )
    foreign = cv2.bitwise_and(vivid, mask)
    foreign_share = cv2.countNonZero(foreign) / count
    red, green, blue = cv2.split(small)
    spread = cv2.subtract(cv2.max(cv2.max(red, green), blue), cv2.min(cv2.min(red, green), blue))
    histogram = cv2.calcHist([spread], [0], mask, [256], [0, 256]).ravel()
    median_spread = float(np.searchsorted(np.cumsum(histogram), count / 2.0))
    luminance = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    smooth = cv2.GaussianBlur(luminance, (0, 0), 2.0)
    detail = float(cv2.mean(cv2.absdiff(luminance, smooth), mask=mask)[0])
    _, deviation = cv2.meanStdDev(smooth, mask=mask)
    variation = float(deviation[0, 0])
    looks = _Looks(
        edge_share=None,
        fundus_share=fundus_share,
        foreign_share=foreign_share,
        monochrome=median_spread <= 8.0,
        flat=variation < 0.5 and detail < 0.3,
        noisy=detail > 6.0 and detail > 0.6 * max(variation, 1.0),
    )
    if not edges:
        return looks
    gradient = cv2.magnitude(
        cv2.Sobel(luminance, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(luminance, cv2.CV_32F, 0, 1, ksize=3)
    )
    # Contrast, not raw gradient: relative to the local brightness (dark and bright photographs alike).
    local = cv2.GaussianBlur(luminance, (0, 0), 4.0)
    local += EDGE_BRIGHTNESS_OFFSET
    strong = cv2.compare(gradient, local * EDGE_CONTRAST, cv2.CMP_GT)
    looks.edge_share = cv2.countNonZero(cv2.bitwise_and(strong, mask)) / count
    return looks


#: Share of fundus-coloured pixels a fitted disk / a fallback area must have.
FITTED_FUNDUS_SHARE = 0.4
FALLBACK_FUNDUS_SHARE = 0.75
#: A strong edge: 3×3 Sobel magnitude above this share of the local brightness (+ an offset that
#: keeps near-black areas calm). The most strong-edge pixels a fallback area (no rim found) may have
#: and still count as a fundus: at most 0.04 on tight crops of the data pack, 0.14–0.32 on natural
#: photographs (scikit-image samples, faces, a cat, coffee).
EDGE_CONTRAST = 0.5
EDGE_BRIGHTNESS_OFFSET = 10.0
FALLBACK_EDGE_SHARE = 0.11


# ----------------------------------------------------------------------------- estimate
def estimate_fov(image: np.ndarray, mode: Literal["auto", "full"] = "auto") -> FovEstimate:
    """Find the field of view of an RGB photograph (see the module docstring).

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        mode: ``auto`` detects; ``full`` takes the whole frame without looking (a caller's override).

    Returns:
        The estimate, in original pixel coordinates.

    Raises:
        NotFundus: the image is clearly not a fundus photograph.
        FovNotFound: the image is smaller than :data:`MIN_SIDE`.
        ValueError: not an ``[H, W, 3]`` uint8 array, or an unknown mode.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("estimate_fov expects an [H, W, 3] uint8 RGB array")
    if mode not in ("auto", "full"):
        raise ValueError(f"unknown FOV mode {mode!r}; expected auto or full")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise FovNotFound(f"image too small for FOV detection ({width}x{height}, minimum side {MIN_SIDE})")
    if mode == "full":
        return full_frame_estimate(height, width)
    small, scale = _analysis_copy(image)
    sh, sw = small.shape[:2]
    smooth = cv2.medianBlur(small, 3)
    colour, noise = _background(smooth)
    difference = _difference(smooth, colour)
    level = _percentile_u8(difference, 90)
    threshold = max(noise + 4.0, 0.08 * level, 4.0)
    component, region = _largest_region(cv2.compare(difference, threshold, cv2.CMP_GT))
    region_share = np.count_nonzero(region) / (sh * sw)
    rng = np.random.default_rng(0)
    fit = _fit_rim(component, region, difference, rng) if region_share >= 0.05 else None
    everything = np.full((sh, sw), 255, np.uint8)

    if fit is not None and fit.plausible and fit.confidence >= FIT_CONFIDENCE:
        disk = np.zeros((sh, sw), np.uint8)
        cv2.circle(disk, (round(fit.cx * 16), round(fit.cy * 16)), round(fit.r * 16), 255, -1, shift=4)
        looks = _appearance(smooth, disk, edges=False)
        # A fitted rim is strong evidence already: only flat or non-fundus colours refuse it.
        fundus_colours = (
            looks.fundus_share >= FITTED_FUNDUS_SHARE and looks.foreign_share <= MAX_FOREIGN_SHARE
        )
        if looks.flat or not (fundus_colours or looks.monochrome):
            raise NotFundus("the image does not look like a fundus photograph (round, but not a fundus)")
        area = _photographed_area(difference, noise, disk)
        circle = FovCircle(
            cx=(fit.cx + 0.5) / scale - 0.5, cy=(fit.cy + 0.5) / scale - 0.5, radius=fit.r / scale
        )
        return FovEstimate(circle, "fitted", round(fit.confidence, 3), height, width, area, scale)

    # No confident rim: a fallback, but only for images that look like fundus photographs. Without
    # a background in the corners, or when the region is most of the frame or a small part of it
    # (the optic disc of a tightly cropped photograph, say), the whole frame is the safe answer.
    tight = not _has_background(smooth) or region_share >= 0.9 or region_share < 0.3
    candidate = everything if tight else region
    looks = _appearance(smooth, candidate, edges=True)
    if (
        looks.flat
        or looks.noisy
        or looks.fundus_share < FALLBACK_FUNDUS_SHARE
        or looks.foreign_share > MAX_FOREIGN_SHARE
        or (looks.edge_share is not None and looks.edge_share > FALLBACK_EDGE_SHARE)
    ):
        raise NotFundus("no fundus field of view found and the image does not look like a fundus photograph")
    if tight:
        return full_frame_estimate(height, width, method="fallback")
    points = cv2.findNonZero(region)
    (bx, by), br = cv2.minEnclosingCircle(points)
    circle = FovCircle(cx=(bx + 0.5) / scale - 0.5, cy=(by + 0.5) / scale - 0.5, radius=(br + 1.0) / scale)
    area = cv2.dilate(region, np.ones((3, 3), np.uint8)).astype(np.float32) / 255.0
    confidence = round(fit.confidence, 3) if fit is not None else 0.0
    return FovEstimate(circle, "fallback", confidence, height, width, area, scale)


def _photographed_area(difference: np.ndarray, noise: float, disk: np.ndarray) -> np.ndarray | None:
    """``[h, w]`` float32 in [0, 1]: the part of the fitted disk that holds picture, not background.

    Pixels of the disk that differ from the background by more than its noise, hole-filled (convex
    hull), with a soft edge just inside their boundary. ``None`` when that is the whole disk (the
    usual case), so a plain circle needs no extra mask.
    """
    picture = cv2.compare(difference, noise + 3.0, cv2.CMP_GT)
    picture = cv2.bitwise_and(picture, disk)
    # Specks of JPEG noise just outside would stretch the hull beyond the picture.
    picture = cv2.morphologyEx(picture, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(picture, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(picture)
    cv2.fillConvexPoly(filled, cv2.convexHull(largest), 255)
    missing = np.count_nonzero(cv2.bitwise_and(disk, cv2.bitwise_not(filled)))
    if missing <= 0.002 * max(np.count_nonzero(disk), 1):
        return None
    # A soft edge that ends at the picture's boundary: eroded by two pixels, then a short ramp.
    inner = cv2.erode(filled, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return cv2.GaussianBlur(inner.astype(np.float32) / 255.0, (0, 0), 0.7)


def detect_fov(image: np.ndarray) -> FovCircle:
    """The FOV circle of a fundus photograph (fitted, or the fallback circle); see :func:`estimate_fov`.

    Raises:
        NotFundus: the image is clearly not a fundus photograph.
        FovNotFound: the image is too small.
        ValueError: not an ``[H, W, 3]`` uint8 array.
    """
    return estimate_fov(image).circle
