"""The API-process image path after its speed work: buffer reuse, no-resample crops, PNG encode."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from model.fov import FovCircle, SquareCrop, fov_mask, from_working, plan_crop, to_working
from service.codecs import EncodeContext, default_registry

CONTEXT = EncodeContext(task="enhance", model_version="test")


def _photo(height: int, width: int, circle: FovCircle, seed: int) -> np.ndarray:
    """A textured disk on black: enough structure for the local gain fit to vary."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 230, (height, width, 3), dtype=np.uint8)
    image[~fov_mask(height, width, circle)] = 0
    return image


def _enhanced(working: np.ndarray) -> np.ndarray:
    """A stand-in model result: a different local gain per channel."""
    gains = np.array([1.3, 0.8, 1.1], dtype=np.float32)
    return np.clip(working.astype(np.float32) * gains + 12, 0, 255).astype(np.uint8)


Case = tuple[np.ndarray, SquareCrop, np.ndarray, np.ndarray]
SPECS = [
    (300, 400, FovCircle(200.0, 150.0, 140.0), 256, 1),
    (200, 200, FovCircle(99.5, 99.5, 98.0), 128, 2),
    (360, 480, FovCircle(240.0, 180.0, 200.0), 256, 3),
]


def _case(height: int, width: int, circle: FovCircle, size: int, seed: int) -> Case:
    """(result, crop, original, working input) for one synthetic photograph."""
    original = _photo(height, width, circle, seed)
    crop = plan_crop(circle, height, width, working_size=size)
    working = to_working(original, crop)
    return _enhanced(working), crop, original, working


def _transfer(case: Case) -> np.ndarray:
    result, crop, original, working = case
    return from_working(result, crop, original, working_input=working)


def test_transfer_is_the_same_whatever_ran_before_and_alongside() -> None:
    cases = [_case(*spec) for spec in SPECS]
    first = [_transfer(case) for case in cases]
    # Reused buffers from other shapes must not leak into a later answer, in any order or thread.
    again = [_transfer(case) for case in reversed(cases)][::-1]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda i: _transfer(cases[i % len(cases)]), range(12)))
    for expected, repeated in zip(first, again, strict=True):
        assert np.array_equal(repeated, expected)
    for i, got in enumerate(parallel):
        assert np.array_equal(got, first[i % len(cases)])
    # The inputs are left as they were.
    for case, spec in zip(cases, SPECS, strict=True):
        fresh = _case(*spec)
        for used, unused in zip((case[0], case[2], case[3]), (fresh[0], fresh[2], fresh[3]), strict=True):
            assert np.array_equal(used, unused)


def test_transfer_reproduces_the_result_when_the_crop_needs_no_resampling() -> None:
    height, width, size = 300, 320, 256
    circle = FovCircle(160.0, 150.0, 126.0)
    original = _photo(height, width, circle, seed=4)
    planned = plan_crop(circle, height, width, working_size=size)
    crop = SquareCrop(circle, planned.x0, planned.y0, side=size, height=height, width=width, size=size)
    working = to_working(original, crop)
    result = _enhanced(working)
    out = from_working(result, crop, original, working_input=working)
    # Inside the FOV the native photograph is the working input itself: the result comes back as is.
    rows, cols = slice(crop.y0, crop.y0 + size), slice(crop.x0, crop.x0 + size)
    inner = fov_mask(height, width, FovCircle(circle.cx, circle.cy, circle.radius - 2))[rows, cols]
    diff = np.abs(out[rows, cols].astype(np.int16) - result.astype(np.int16))[inner]
    assert diff.max() <= 1
    outside = ~fov_mask(height, width, FovCircle(circle.cx, circle.cy, circle.radius + 1))
    assert np.array_equal(out[outside], original[outside])


class _AllPicture:
    """A photographed area covering the whole frame: from_working takes its general weighted blend."""

    def area_weight(self, rows: slice, cols: slice) -> np.ndarray:
        return np.ones((rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)


def test_blending_only_the_rim_band_equals_blending_everywhere() -> None:
    # The last spec's circle runs past the top and bottom of the frame (a clipped field of view).
    for spec in [*SPECS, (300, 480, FovCircle(240.0, 150.0, 190.0), 256, 5)]:
        result, crop, original, working = _case(*spec)
        disk_only = from_working(result, crop, original, working_input=working)
        weighted = from_working(result, crop, original, working_input=working, area=_AllPicture())
        diff = np.abs(disk_only.astype(np.int16) - weighted.astype(np.int16))
        assert diff.max() <= 1, spec
        assert np.count_nonzero(diff) <= 1e-3 * diff.size, spec
        rim = FovCircle(crop.circle.cx, crop.circle.cy, crop.circle.radius + 0.5)
        outside = ~fov_mask(*original.shape[:2], rim)
        assert np.array_equal(disk_only[outside], original[outside])


def test_png_encode_keeps_channel_order_and_gray() -> None:
    codec = default_registry().by_format("png")
    assert codec is not None
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # pure red must stay red (RGB in, RGB stored)
    pixels[10:20, 10:30, 2] = 90
    data = codec.encode(pixels, original=None, context=CONTEXT)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == "RGB" and np.array_equal(np.asarray(stored), pixels)
    gray = codec.encode(pixels[..., :1], original=None, context=CONTEXT)
    stored = Image.open(io.BytesIO(gray))
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), pixels[..., 0])
