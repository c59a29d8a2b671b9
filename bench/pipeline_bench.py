"""API-process image pipeline benchmark: per-step milliseconds outside the model, for one request.

Times, on one machine and in one run, the CPU work the API process does around the model for a
512×512 PNG (a data-pack photograph resized, as in ``serve_bench.py``) and for a 1536×1024 HRF photograph:
decode, FOV detection, crop to the working size, mapping the result back (``transfer`` and ``resize``)
and PNG encode. The model itself is replaced by an identity (the working input is the "result"), which
does not change the cost of any step. Prints one JSON object with wall and CPU medians per step;
``overhead_ms`` / ``overhead_cpu_ms`` sum the steps of an ``/enhance`` request with ``transfer`` (the
default path). The HTTP layer is not included (``serve_bench.py`` measures end to end).

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

from model.fov import from_working, plan_crop, to_working  # noqa: E402
from model.fov_detect import detect_fov, estimate_fov  # noqa: E402
from model.restore import WorkingView  # noqa: E402
from service.codecs import EncodeContext, default_registry  # noqa: E402
from service.imaging import Prepared, decode_upload, restore_enhanced  # noqa: E402
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
    timings = {name: timed(fn, repeats) for name, fn in steps.items()}
    request = ("decode", "detect_fov", "to_working", "from_working_transfer", "encode_png")
    return {
        "size": f"{decoded.width}x{decoded.height}",
        "crop_side": crop.side,
        "upload_bytes": len(data),
        "steps_ms": {name: wall for name, (wall, _) in timings.items()},
        "steps_cpu_ms": {name: cpu for name, (_, cpu) in timings.items()},
        "overhead_ms": round(sum(timings[name][0] for name in request), 2),
        "overhead_cpu_ms": round(sum(timings[name][1] for name in request), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per step (median reported)")
    parser.add_argument("--working-size", type=int, default=512)
    args = parser.parse_args()
    report: dict[str, Any] = {"opencv_threads": cv2.getNumThreads()}
    report["png_512"] = bench_image(fundus_512(), args.working_size, args.repeats)
    hrf = fundus_hrf()
    if hrf is not None:
        report["hrf_1536x1024"] = bench_image(hrf, args.working_size, args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
