"""Field-of-view estimation speed on large photographs, one core, printed as JSON.

Photographs of the data pack are scaled to 3,000 pixels wide in a few simple camera styles (as
stored, clipped top and bottom, hazy, dark), JPEG-encoded at quality 90 and decoded once; the
estimate is then timed on the decoded pixels (what the service does after decoding). The JPEG
decode of the same image is timed in the same run, so ``estimate_over_decode`` says how detection
compares with the decode every request pays anyway, whatever the machine's speed.

Usage: ``python bench/fov_bench.py [--data ../shared/data] [--repeats 15] [--width 3000]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.fov_detect import estimate_fov

STYLES = ("plain", "clip_tb", "haze", "dark")
PHOTOS = ("hrf/images/05_g.jpg", "chase_db1/images/Image_07R.jpg", "idrid/images/IDRiD_079.jpg",
          "fives/images/10_A.jpg", "deepdrid/images/100_r2.jpg")  # fmt: skip


def styled(photo: np.ndarray, style: str, width: int) -> np.ndarray:
    """``photo`` scaled to ``width`` pixels wide, in one of :data:`STYLES`."""
    height = round(photo.shape[0] * width / photo.shape[1])
    image = cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC)
    if style == "clip_tb":
        image = np.ascontiguousarray(image[height // 8 : height - height // 8])
    elif style == "haze":
        image = cv2.convertScaleAbs(image, alpha=0.9, beta=15)
    elif style == "dark":
        image = cv2.convertScaleAbs(image, alpha=0.4)
    return image


def median_ms(fn: object, repeats: int) -> float:
    assert callable(fn)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=int, default=3000)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    estimates, decodes, methods = [], [], []
    for relative in PHOTOS:
        photo = cv2.imread(str(Path(args.data) / relative), cv2.IMREAD_COLOR)
        assert photo is not None, relative
        for style in STYLES:
            ok, data = cv2.imencode(".jpg", styled(photo, style, args.width), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            decoded = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            decodes.append(median_ms(lambda data=data: cv2.imdecode(data, cv2.IMREAD_COLOR), args.repeats))
            estimates.append(median_ms(lambda decoded=decoded: estimate_fov(decoded), args.repeats))
            methods.append(estimate_fov(decoded).method)
    result = {
        "width": args.width,
        "images": len(estimates),
        "threads": 1,
        "estimate_ms_p50": round(float(np.median(estimates)), 2),
        "estimate_ms_max": round(float(np.max(estimates)), 2),
        "jpeg_decode_ms_p50": round(float(np.median(decodes)), 2),
        "estimate_over_decode": round(float(np.median(np.array(estimates) / np.array(decodes))), 3),
        "methods": {m: methods.count(m) for m in sorted(set(methods))},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
