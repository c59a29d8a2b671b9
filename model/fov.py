"""Field-of-view geometry of fundus photographs: detect the round FOV, crop it to a square working
image, and map working-size results back onto the original photograph.

Fundus cameras image the retina through a circular aperture. Depending on the camera the circle sits on
a dark or a bright background, may be clipped at the top and bottom of the frame, and may carry burned-in
text outside it. :func:`model.fov_detect.estimate_fov` finds the circle; :func:`plan_crop` and
:func:`to_working` turn any photograph into a centred, zero-padded ``S×S`` working image (the model's
input geometry, 512² by default) and :func:`from_working` puts a working-size result back at the
original size and placement, blended into the original inside the field of view only.

Coordinates: pixel centres sit at integer positions, so pixel ``(x, y)`` belongs to the FOV when
``(x - cx)² + (y - cy)² <= r²``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

__all__ = [
    "FovCircle",
    "FovNotFound",
    "SquareCrop",
    "fov_mask",
    "from_working",
    "plan_crop",
    "soft_disk",
    "to_working",
    "working_fov_mask",
]

#: Local gain bound of the ``transfer`` mapping in :func:`from_working`.
MAX_TRANSFER_GAIN = 4.0
#: Windows of at least this radius are summed on a 2× coarser grid in the ``transfer`` gain fit (speed).
COARSE_GAIN_MIN_RADIUS = 4
#: ``transfer`` resamples its fields to the native box with area averaging only below this box/working
#: size ratio; near 1:1 bilinear is as faithful (slightly sharper on HRF oracles) and several times faster.
REST_AREA_BELOW = 0.9
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


def soft_disk(height: int, width: int, circle: FovCircle) -> np.ndarray:
    """``[H, W]`` float32 in [0, 1]: 1 inside, 0 outside, a one-pixel linear ramp across the edge."""
    ys = np.arange(height, dtype=np.float64)[:, None] - circle.cy
    xs = np.arange(width, dtype=np.float64)[None, :] - circle.cx
    distance = np.sqrt(xs * xs + ys * ys)
    return np.clip(circle.radius - distance + 0.5, 0.0, 1.0).astype(np.float32)


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


def _box_bounds(crop: SquareCrop) -> tuple[int, int, int, int]:
    """``(sx0, sy0, sx1, sy1)``: the part of the crop box inside the image, in image coordinates."""
    sx0, sy0 = max(crop.x0, 0), max(crop.y0, 0)
    sx1, sy1 = min(crop.x0 + crop.side, crop.width), min(crop.y0 + crop.side, crop.height)
    return sx0, sy0, max(sx1, sx0), max(sy1, sy0)


def _extract_box(image: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """The ``side × side`` box of ``image``, zero-padded where it leaves the image.

    When the box lies inside the image this is a view of ``image`` (no copy).
    """
    sx0, sy0, sx1, sy1 = _box_bounds(crop)
    if sx1 - sx0 == crop.side and sy1 - sy0 == crop.side:
        return image[sy0:sy1, sx0:sx1]
    box = np.zeros((crop.side, crop.side, *image.shape[2:]), dtype=image.dtype)
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
    if np.shares_memory(working, image):
        working = working.copy()
    # Zero outside the circle: a masked subtraction of the image from itself, in place (a tenth of
    # the time of multiplying by a broadcast boolean mask).
    outside = np.logical_not(fov_mask(crop.size, crop.size, crop.working_circle)).view(np.uint8)
    cv2.subtract(working, working, dst=working, mask=outside)
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
    return soft_disk(crop.size, crop.size, crop.working_circle) * np.outer(rows, cols)


def _resample_box(values: np.ndarray, crop: SquareCrop, interpolation: int | None = None) -> np.ndarray:
    """Resample a working-size ``[S, S, C]`` array to the ``[side, side, C]`` original box.

    ``C`` ≤ 4 (one ``cv2.resize`` call). Area averaging when the box is smaller than the working image,
    bilinear otherwise, unless ``interpolation`` says; no resampling when both sizes agree.
    """
    channels = values.shape[2]
    if crop.side == crop.size:
        return values
    if interpolation is None:
        interpolation = cv2.INTER_AREA if crop.side < crop.size else cv2.INTER_LINEAR
    out = cv2.resize(values, (crop.side, crop.side), interpolation=interpolation)
    return out.reshape(crop.side, crop.side, channels)


def _in_image(box: np.ndarray, crop: SquareCrop) -> np.ndarray:
    """The part of a ``[side, side, C]`` box that lies inside the image (a view; see :func:`_box_bounds`)."""
    sx0, sy0, sx1, sy1 = _box_bounds(crop)
    return box[sy0 - crop.y0 : sy1 - crop.y0, sx0 - crop.x0 : sx1 - crop.x0]


#: Float buffers of :func:`from_working` up to this size are kept for reuse (see :func:`_workspace`).
WORKSPACE_MAX_BYTES = 16 * 1024 * 1024
#: Idle workspaces kept at most (about one per concurrently mapping thread; ~17 MB each at 512²).
WORKSPACE_POOL_SIZE = 2


class _Workspace:
    """Named float32 buffers reused across calls.

    Fresh multi-megabyte arrays are expensive here: every call would fault in and zero new pages (often
    more time than the arithmetic on them). Buffers larger than :data:`WORKSPACE_MAX_BYTES` are not kept.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised float32 array of ``shape``, the same one as last time when it fits."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = np.empty(shape, dtype=np.float32)
            if buffer.nbytes <= WORKSPACE_MAX_BYTES:
                self._buffers[name] = buffer
            else:
                self._buffers.pop(name, None)
        return buffer


_IDLE_WORKSPACES: list[_Workspace] = []
_WORKSPACE_LOCK = threading.Lock()


@contextmanager
def _workspace() -> Iterator[_Workspace]:
    """Borrow a workspace for one call (thread-safe; a new one when all are in use)."""
    with _WORKSPACE_LOCK:
        workspace = _IDLE_WORKSPACES.pop() if _IDLE_WORKSPACES else _Workspace()
    try:
        yield workspace
    finally:
        with _WORKSPACE_LOCK:
            if len(_IDLE_WORKSPACES) < WORKSPACE_POOL_SIZE:
                _IDLE_WORKSPACES.append(workspace)


def _box_mean(x: np.ndarray, radius: int, out: np.ndarray | None = None) -> np.ndarray:
    ksize = (2 * radius + 1, 2 * radius + 1)
    if out is not None:
        cv2.blur(x, ksize, dst=out, borderType=cv2.BORDER_REFLECT)
        return out
    return cv2.blur(x, ksize, borderType=cv2.BORDER_REFLECT).reshape(x.shape)


def _local_gain(
    source: np.ndarray, target: np.ndarray, radius: int, eps: float, scratch: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Per-channel local gain of the linear model ``target ≈ gain · source + offset`` (guided filter).

    Both arrays are ``[S, S, C]`` float32 on the same intensity scale; ``eps`` is the regularisation on
    that scale (variance units); ``scratch`` is a free ``[S, S, C]`` float32 buffer and ``out`` receives
    the result (same shape). The gain is
    ``cov / (var + eps)`` from ``(2r+1)``-pixel windows, averaged again over such windows.

    Once the window is wide enough (``radius`` ≥ :data:`COARSE_GAIN_MIN_RADIUS`) the window statistics
    ``Σs, Σt, Σst, Σs²`` are taken on a grid twice as coarse, a quarter of the work: the products are
    formed at full resolution and 2×2-averaged (exact local sums), then box-filtered with half the
    radius, i.e. ``(2r+2)``-pixel windows sampled every second pixel. Those coefficients vary smoothly:
    the second window average runs on the same grid and the gain is interpolated back bilinearly (on
    HRF illumination oracles the mapped result is within 0.02 dB PSNR of the full-resolution fit).

    Returns:
        ``[S, S, C]`` float32 gain, bounded to ``[0, MAX_TRANSFER_GAIN]`` so flat, noisy windows cannot
        amplify native noise without limit. The offset is not needed by the caller: it adds back
        everything the gain misses at working size.
    """
    height, width = source.shape[:2]
    coarse = radius >= COARSE_GAIN_MIN_RADIUS and min(height, width) >= 16
    full_radius = radius
    if coarse:
        radius //= 2
        grid = (width // 2, height // 2)
        # Bilinear sampling at exactly half size is the 2×2 mean (and faster than area averaging).
        halving = cv2.INTER_LINEAR if height % 2 == 0 and width % 2 == 0 else cv2.INTER_AREA

    def window_mean(values: np.ndarray) -> np.ndarray:
        if coarse:
            values = cv2.resize(values, grid, interpolation=halving).reshape(grid[1], grid[0], -1)
        return _box_mean(values, radius)

    mean_s = window_mean(source)
    mean_t = window_mean(target)
    mean_st = window_mean(np.multiply(source, target, out=scratch))
    mean_ss = window_mean(np.multiply(source, source, out=scratch))
    mean_st -= np.multiply(mean_s, mean_t, out=mean_t)
    mean_ss -= np.multiply(mean_s, mean_s, out=mean_s)
    mean_ss += eps
    mean_st /= mean_ss
    if coarse:
        # The coefficients vary smoothly, so their window average is taken on the coarse grid too
        # and only the result is interpolated back (upsampling and box averaging nearly commute on
        # a smooth field; a full-resolution average cost as much as the four coarse ones together).
        averaged = _box_mean(mean_st, radius)
        gain = cv2.resize(averaged, (width, height), dst=out, interpolation=cv2.INTER_LINEAR)
        gain = gain.reshape(source.shape)
    else:
        gain = _box_mean(mean_st, full_radius, out=out)
    np.maximum(gain, 0.0, out=gain)
    np.minimum(gain, MAX_TRANSFER_GAIN, out=gain)
    return gain


class AreaWeight(Protocol):
    """Something that knows which original pixels hold picture (see ``model.fov_detect.FovEstimate``)."""

    def area_weight(self, rows: slice, cols: slice) -> np.ndarray | None:
        """``[h, w]`` float32 in [0, 1] over original pixels ``[rows, cols]``; None = all picture."""
        ...


def _disk_distances(crop: SquareCrop, margin: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray, float]:
    """The image region of the crop box, squared distances from the FOV centre over it and the edge.

    Returns ``((rows, cols), squared, edge)``: ``squared`` is ``[h, w]`` float32; ``edge`` the
    radius, shrunk by ``margin`` pixels, plus half a pixel, where the soft disk's weight
    ``clip(edge − distance, 0, 1)`` reaches 0. The box holds the circle plus a margin, so the weight
    is zero everywhere outside this region.
    """
    sx0, sy0, sx1, sy1 = _box_bounds(crop)
    circle = crop.circle
    ys = np.arange(sy0, sy1, dtype=np.float64) - circle.cy
    xs = np.arange(sx0, sx1, dtype=np.float64) - circle.cx
    squared = (ys * ys).astype(np.float32)[:, None] + (xs * xs).astype(np.float32)[None, :]
    return (slice(sy0, sy1), slice(sx0, sx1)), squared, circle.radius - margin + 0.5


def _soft_weight(squared: np.ndarray, edge: float, picture: np.ndarray | None) -> np.ndarray:
    """``[h, w, 1]`` float32 blending weight: the soft disk (see :func:`_disk_distances`) times the
    photographed-area weight ``picture`` when there is one."""
    weight = np.float32(edge) - np.sqrt(squared)
    np.clip(weight, 0.0, 1.0, out=weight)
    if picture is not None:
        weight *= picture
    return weight[..., None]


def _blend_weighted(mapped: np.ndarray, base: np.ndarray, weight: np.ndarray) -> None:
    """``mapped ← base + weight · (mapped − base)`` in place (``[h, w, C]`` float32, ``base`` uint8,
    ``weight`` ``[h, w, 1]``)."""
    mapped -= base
    mapped *= weight
    mapped += base


def _blend_on_disk(
    out: np.ndarray, mapped: np.ndarray, base: np.ndarray, squared: np.ndarray, edge: float
) -> None:
    """``out ← base + w · (mapped − base)`` with ``w`` the soft disk, writing only where ``w`` > 0.

    ``out`` is the ``[h, w, C]`` uint8 region (already holding ``base``), ``mapped`` ``[h, w, C]``
    float32, ``base`` uint8. Inside the disk ``w`` is 1 and the answer is ``mapped`` itself; only the
    one-pixel rim band needs the blend. Three full float passes fewer than blending everywhere, and
    no square root per pixel, with the same result up to float rounding (at most one grey level).
    """
    if squared.size == 0:
        return
    within = cv2.compare(squared, float(edge * edge), cv2.CMP_LT)
    inner = edge - 1.0
    inside = cv2.compare(squared, float(inner * inner), cv2.CMP_LE) if inner > 0 else np.zeros_like(within)
    cv2.copyTo(_to_uint8(mapped), inside, out)  # in place: ``out`` is a view of the answer
    band = cv2.findNonZero(cv2.subtract(within, inside))
    if band is not None:
        points = band.reshape(-1, 2)  # (x, y) per point
        rows, cols = points[:, 1], points[:, 0]
        weight = np.clip(np.float32(edge) - np.sqrt(squared[rows, cols]), 0.0, 1.0)[:, None]
        below = base[rows, cols].astype(np.float32)
        out[rows, cols] = _to_uint8(below + weight * (mapped[rows, cols] - below))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """float32 grey levels → uint8, rounded half to even and saturated (one pass)."""
    if values.size == 0:  # a crop box entirely outside the image
        return np.zeros(values.shape, dtype=np.uint8)
    return cv2.multiply(values, 1.0, dtype=cv2.CV_8U).reshape(values.shape)


def _transfer_fields(
    result: np.ndarray, working_input: np.ndarray, native: np.ndarray, crop: SquareCrop, workspace: _Workspace
) -> np.ndarray:
    """``gain · native + rest`` over the image part of the crop box: ``[h, w, C]`` float32.

    ``result`` and ``working_input`` are ``[S, S, C]`` uint8, ``native`` the ``[h, w, C]`` uint8 original
    under the box. ``gain`` is the local gain fitted at working size and ``rest = result − gain · input``
    (the offset plus whatever the local model misses), both resampled to the box. The array lives in
    ``workspace``.
    """
    shape = result.shape
    res = workspace.get("result", shape)
    np.copyto(res, result)
    src = workspace.get("input", shape)
    np.copyto(src, working_input)
    gain = workspace.get("gain", shape)
    radius = max(2, round(8 * crop.size / 512))
    _local_gain(src, res, radius, TRANSFER_EPS * 255.0 * 255.0, workspace.get("scratch", shape), gain)
    box_shape = (crop.side, crop.side, shape[2])
    # Near 1:1 (and when enlarging) bilinear is as faithful as area averaging and several times faster.
    interpolation = cv2.INTER_AREA if crop.side < REST_AREA_BELOW * crop.size else cv2.INTER_LINEAR
    if crop.side == crop.size:
        field = gain
    else:
        field = workspace.get("field", box_shape)
        cv2.resize(gain, (crop.side, crop.side), dst=field, interpolation=interpolation)
    # offset + leftover = result − gain · source: the residual carries the offset as well.
    rest = np.subtract(res, np.multiply(gain, src, out=src), out=res)
    if crop.side != crop.size:
        rest_box = workspace.get("rest", box_shape)
        cv2.resize(rest, (crop.side, crop.side), dst=rest_box, interpolation=interpolation)
        rest = rest_box
    transferred = _in_image(field, crop)
    transferred *= native
    transferred += _in_image(rest, crop)
    return transferred


def from_working(
    result: np.ndarray,
    crop: SquareCrop,
    original: np.ndarray,
    *,
    working_input: np.ndarray | None = None,
    method: Literal["transfer", "resize"] = "transfer",
    area: AreaWeight | None = None,
    rim_margin: float = 0.0,
) -> np.ndarray:
    """Map a working-size result back onto the original photograph's geometry.

    Args:
        result: ``[S, S, C]`` uint8 model output in working geometry (``[S, S]`` or one channel for
            single-channel maps such as vessel probabilities, which always use ``resize``).
        crop: the crop that produced the working image.
        original: ``[H, W, C]`` uint8 original photograph (``C`` = result channels for ``resize``).
        working_input: ``[S, S, C]`` uint8 working image the result was computed from; recomputed with
            :func:`to_working` when omitted (``transfer`` only).
        area: the photographed part of the frame (a FOV estimate); the result is blended in only
            there, so where the circle runs past the picture (elliptical or clipped fields) the
            original pixels stay.
        rim_margin: shrink the blending disk by this many original pixels (vessel maps: the model
            answers the step at the rim of the zero-padded working image with a false vessel).
        method: ``"resize"`` upsamples the result; ``"transfer"`` carries the enhancement over to native
            resolution: a local gain (guided-filter coefficients, fitted between ``working_input`` and
            ``result`` in 17×17 windows at 512²) is upsampled and applied to the native original, and
            whatever that local gain misses at working size (the offset included) is added as an
            upsampled residual. Native detail finer than the working grid survives, with the local
            gain applied to it, while the result is reproduced exactly at working resolution.

    Returns:
        ``[H, W, C]`` uint8 (or ``[H, W]`` for a 2-D result): the same size and FOV placement as
        ``original``; outside the FOV the original pixels are kept (zeros for a single-channel result
        over a colour original).

    All work after the working-size fit is restricted to the crop box (outside it the soft FOV disk is
    zero) and done in float32 grey levels; when the crop box already has the working size, the fields
    are used as they are.
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
    channels = 1 if flat else result.shape[2]
    same_channels = original.ndim == 3 and original.shape[2] == channels
    roi, squared, edge = _disk_distances(crop, rim_margin)
    picture = area.area_weight(*roi) if area is not None else None

    if channels == 1 or method == "resize" or not same_channels:
        # out = base · (1 − w) + mapped · w  =  base + w · (mapped − base)
        weight = _soft_weight(squared, edge, picture)
        res = (result[..., None] if flat else result).astype(np.float32)
        # Owned by this call (``res`` itself when no resampling is needed): blended in place.
        blended = _in_image(_resample_box(res, crop), crop)
        if same_channels:
            _blend_weighted(blended, original[roi], weight)
            out = original.copy()
        else:
            blended *= weight
            out = np.zeros((crop.height, crop.width, channels), dtype=np.uint8)
    else:
        if working_input is None:
            working_input = to_working(original, crop)
        if working_input.shape != result.shape:
            raise ValueError(f"working_input is {working_input.shape}, result is {result.shape}")
        with _workspace() as workspace:
            base = original[roi]
            mapped = _transfer_fields(result, working_input, base, crop, workspace)
            out = original.copy()
            if picture is None:
                _blend_on_disk(out[roi], mapped, base, squared, edge)
            else:
                _blend_weighted(mapped, base, _soft_weight(squared, edge, picture))
                out[roi] = _to_uint8(mapped)
        return out
    out[roi] = _to_uint8(blended)
    return out[..., 0] if flat else out
