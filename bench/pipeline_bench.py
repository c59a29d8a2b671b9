"""API-process image pipeline benchmark: per-step milliseconds outside the model, for one request.

Times, on one machine and in one run, the CPU work the API process does around the model for a
512×512 PNG (a data-pack photograph resized, as in ``serve_bench.py``) and for a 1536×1024 HRF photograph:
decode, FOV detection, crop to the working size, mapping the result back (``transfer`` and ``resize``)
and PNG encode. The model itself is replaced by an identity (the working input is the "result"), which
does not change the cost of any step. Prints one JSON object with wall and CPU medians per step;
``overhead_ms`` / ``overhead_cpu_ms`` sum the steps of an ``/enhance`` request with ``transfer`` (the
default path). The HTTP layer is not included (``serve_bench.py`` measures end to end). The process runs
with the API process's heap and thread settings: freed memory kept for reuse, OpenCV threads per call
as one request-pool thread gets them.

``before_after`` times, in the same run, each change made to cut this work against what it replaced:
PNG decode through libpng vs Pillow, PNG encode of the RGB answer through fpng vs libpng's fast settings
(which had replaced Pillow; ``answer_png_bytes_libpng`` is the size it wrote), the working
crop's planes → pixels (``cv2.merge`` vs a transposed copy), and the circle fit's inlier count
(squared distances in float32, as the fit counts them, conversion included, vs square roots in
float64, on the rim points of the photograph). ``grade_quality`` is the
quality grader, which runs in the model process's pass (input and output: twice per ``/enhance``),
reported beside the image steps; ``request_cpu_ms`` adds it (all CPU per request where one machine
runs both); ``overhead_cpu_ms_with_replaced_ways`` is the overhead as it would
be with every replaced way (the sum of the savings added back). ``jpeg_camera`` decodes a 3072×2048
JPEG in full and with reduced DCT (``draft``) to show what a reduced decode would save where full
pixels are not needed.

    python bench/pipeline_bench.py --repeats 15
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.device import reuse_freed_memory  # noqa: E402
from model.fov import from_working, plan_crop, to_working  # noqa: E402
from model.fov_detect import _count_on_circles, _tolerance, detect_fov, estimate_fov  # noqa: E402
from model.quality import BUNDLED_QUALITY, load_quality  # noqa: E402
from model.restore import WorkingView  # noqa: E402
from service.app import share_cores_with_pool  # noqa: E402
from service.codecs import EncodeContext, default_registry  # noqa: E402
from service.codecs.raster import _PNG_PARAMS, PillowCodec  # noqa: E402
from service.imaging import Prepared, decode_upload, planes_to_pixels, restore_enhanced  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.upload import Upload  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
CONTEXT = EncodeContext(task="enhance", model_version="bench")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and CPU time (all threads of this process) of ``fn`` in ms, after one warm-up call.

    CPU time is the steadier number on a shared machine: it leaves out time spent waiting for a core.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - started) * 1e3)
        cpu.append((time.process_time() - started_cpu) * 1e3)
    return round(statistics.median(wall), 2), round(statistics.median(cpu), 2)


def png_bytes(pixels: np.ndarray) -> bytes:
    """The upload as a client would send it (Pillow's default PNG settings)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fundus_512() -> np.ndarray:
    """uint8 [512, 512, 3]: the first DeepDRiD photograph resized, else a synthetic disc."""
    candidates = sorted((DATA / "deepdrid" / "images").glob("*.jpg"))
    if candidates:
        return np.asarray(Image.open(candidates[0]).convert("RGB").resize((512, 512)))
    ys, xs = np.mgrid[:512, :512]
    inside = (xs - 256) ** 2 + (ys - 256) ** 2 <= 230**2
    rng = np.random.default_rng(0)
    image = np.zeros((512, 512, 3), np.uint8)
    image[inside] = np.clip(np.array([170, 80, 35]) + rng.integers(-25, 25, (int(inside.sum()), 3)), 0, 255)
    return image


def fundus_hrf() -> np.ndarray | None:
    """uint8 [1024, 1536, 3]: an HRF photograph at a third of its linear size, or None without data."""
    path = DATA / "hrf" / "images" / "02_h.jpg"
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (1536, 1024), interpolation=cv2.INTER_AREA)


def libpng_png(pixels: np.ndarray) -> bytes:
    """RGB PNG through libpng's fast settings (the encoder the service used before fpng)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), _PNG_PARAMS)
    assert ok
    return encoded.tobytes()


def circle_trials(pixels: np.ndarray, trials: int = 160) -> tuple[np.ndarray, ...]:
    """Rim points of the photograph's FOV (analysis grid) and random candidate circles through them."""
    circle = detect_fov(pixels)
    scale = 384 / max(pixels.shape[:2])
    angles = np.linspace(0, 2 * np.pi, 1200, endpoint=False)
    rng = np.random.default_rng(0)
    radius = circle.radius * scale
    points = np.stack(
        [circle.cx * scale + radius * np.cos(angles), circle.cy * scale + radius * np.sin(angles)], axis=1
    ) + rng.normal(0, 1.0, (len(angles), 2))
    cx = circle.cx * scale + rng.normal(0, 3, trials)
    cy = circle.cy * scale + rng.normal(0, 3, trials)
    r = radius + rng.normal(0, 3, trials)
    return points, cx, cy, r, _tolerance(r)


def count_with_roots(
    points: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, tol: np.ndarray
) -> Any:
    """The circle fit's inlier count as it was: one square root per point and circle."""
    residual = np.abs(
        np.hypot(points[None, :, 0] - cx[:, None], points[None, :, 1] - cy[:, None]) - r[:, None]
    )
    return (residual <= tol[:, None]).sum(axis=1)


def before_after(before: Callable[[], Any], after: Callable[[], Any], repeats: int) -> dict[str, float]:
    """CPU medians of the replaced way and the current one, alternated call by call (fair on a busy box)."""
    before_ms, after_ms = [], []
    before()
    after()
    for _ in range(repeats):
        for fn, into in ((before, before_ms), (after, after_ms)):
            started = time.process_time()
            fn()
            into.append((time.process_time() - started) * 1e3)
    b, a = statistics.median(before_ms), statistics.median(after_ms)
    return {
        "before_cpu_ms": round(b, 2),
        "after_cpu_ms": round(a, 2),
        "speedup": round(b / a, 2) if a else 0.0,
    }


def bench_image(pixels: np.ndarray, working_size: int, repeats: int) -> dict[str, Any]:
    """Per-step medians for one image; the working input stands in for the model result."""
    registry = default_registry()
    codec = registry.by_media_type("image/png")
    assert codec is not None
    data = png_bytes(pixels)
    upload = Upload(data, "image/png")
    decoded = decode_upload(registry, upload, max_pixels=10**8, min_side=1)
    circle = detect_fov(decoded.pixels)
    crop = plan_crop(circle, decoded.height, decoded.width, working_size)
    working = to_working(decoded.pixels, crop)
    prepared = Prepared(
        decoded=decoded, view=WorkingView(crop=crop, working=working, fov=estimate_fov(decoded.pixels))
    )
    result = prepared.model_input()
    restored = restore_enhanced(prepared, result, output_size="original", method="transfer")
    steps = {
        "decode": lambda: decode_upload(registry, upload, max_pixels=10**8, min_side=1),
        "detect_fov": lambda: detect_fov(decoded.pixels),
        "to_working": lambda: to_working(decoded.pixels, crop),
        "from_working_transfer": lambda: restore_enhanced(
            prepared, result, output_size="original", method="transfer"
        ),
        "from_working_resize": lambda: from_working(working, crop, decoded.pixels, method="resize"),
        "encode_png": lambda: codec.encode(restored, original=decoded, context=CONTEXT),
    }
    grader = load_quality(BUNDLED_QUALITY)
    steps["grade_quality"] = lambda: grader.grade(prepared.working)
    timings = {name: timed(fn, repeats) for name, fn in steps.items()}
    request = ("decode", "detect_fov", "to_working", "from_working_transfer", "encode_png")
    png_codec = codec
    trials = circle_trials(decoded.pixels)
    changes = {
        "decode_png_libpng_vs_pillow": before_after(
            lambda: PillowCodec.decode(png_codec, data, max_pixels=10**8),  # type: ignore[arg-type]
            lambda: png_codec.decode(data, max_pixels=10**8),
            repeats,
        ),
        "encode_png_fpng_vs_libpng": before_after(
            lambda: libpng_png(restored),
            lambda: png_codec.encode(restored, original=decoded, context=CONTEXT),
            repeats,
        ),
        "planes_to_pixels_merge_vs_transpose": before_after(
            lambda: np.ascontiguousarray(result.transpose(1, 2, 0)),
            lambda: planes_to_pixels(result),
            repeats,
        ),
        "fov_circle_inliers_squared_vs_roots": before_after(
            lambda: count_with_roots(*trials),
            lambda: _count_on_circles(*[np.asarray(v, dtype=np.float32) for v in trials]),
            repeats,
        ),
    }
    # Twice per fit: the circle fit runs RANSAC on the outline and again on the refined rim.
    saved = sum(c["before_cpu_ms"] - c["after_cpu_ms"] for c in changes.values()) + (
        changes["fov_circle_inliers_squared_vs_roots"]["before_cpu_ms"]
        - changes["fov_circle_inliers_squared_vs_roots"]["after_cpu_ms"]
    )
    overhead_cpu = sum(timings[name][1] for name in request)
    return {
        "size": f"{decoded.width}x{decoded.height}",
        "crop_side": crop.side,
        "upload_bytes": len(data),
        "answer_png_bytes": len(codec.encode(restored, original=decoded, context=CONTEXT)),
        "answer_png_bytes_libpng": len(libpng_png(restored)),
        "steps_ms": {name: wall for name, (wall, _) in timings.items()},
        "steps_cpu_ms": {name: cpu for name, (_, cpu) in timings.items()},
        "overhead_ms": round(sum(timings[name][0] for name in request), 2),
        "overhead_cpu_ms": round(overhead_cpu, 2),
        "request_cpu_ms": round(overhead_cpu + 2 * timings["grade_quality"][1], 2),
        "before_after": changes,
        "overhead_cpu_ms_with_replaced_ways": round(overhead_cpu + saved, 2),
    }


def bench_jpeg_camera(repeats: int) -> dict[str, Any] | None:
    """A 3072×2048 JPEG (an HRF photograph enlarged, quality 95) decoded in full and at 1/2 and 1/4 scale."""
    hrf = fundus_hrf()
    if hrf is None:
        return None
    big = cv2.resize(hrf, (3072, 2048), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()

    def draft(scale: int) -> Callable[[], Any]:
        def decode() -> np.ndarray:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (3072 // scale, 2048 // scale))
            return np.asarray(image.convert("RGB"))

        return decode

    registry = default_registry()
    upload = Upload(data, "image/jpeg")
    steps = {
        "decode_full": lambda: decode_upload(registry, upload, max_pixels=10**8, min_side=1),
        "decode_draft_half": draft(2),
        "decode_draft_quarter": draft(4),
    }
    return {
        "size": "3072x2048",
        "upload_bytes": len(data),
        "steps_cpu_ms": {name: timed(fn, repeats)[1] for name, fn in steps.items()},
        "note": "draft decoding is not used: the default transfer mapping (and resize, outside the FOV) "
        "answers with the native pixels, so /enhance needs the full decode anyway",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per step (median reported)")
    parser.add_argument("--working-size", type=int, default=512)
    args = parser.parse_args()
    # The API process's own settings: glibc keeps freed blocks for reuse (FUNDUS_REUSE_FREED_MEMORY,
    # on by default; fresh multi-megabyte arrays otherwise cost page faults), and each OpenCV call
    # gets the cores one request-pool thread has.
    report: dict[str, Any] = {
        "reuse_freed_memory": reuse_freed_memory(),
        "opencv_threads": share_cores_with_pool(Settings(_env_file=None).cpu_threads),  # type: ignore[call-arg]
    }
    report["png_512"] = bench_image(fundus_512(), args.working_size, args.repeats)
    hrf = fundus_hrf()
    if hrf is not None:
        report["hrf_1536x1024"] = bench_image(hrf, args.working_size, args.repeats)
    jpeg = bench_jpeg_camera(max(3, args.repeats // 3))
    if jpeg is not None:
        report["jpeg_camera"] = jpeg
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
