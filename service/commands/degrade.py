"""``fundus degrade``: reproducible Cofe-Net degradation of a photograph or a folder of photographs.

Each photograph is FOV-detected, cropped to the square working image (``--size``, 512 by default),
degraded and written as ``<stem>.png`` with the sampled parameters in ``<stem>.json``. A single file
uses ``--seed`` itself; in a folder every file gets its own seed derived from ``--seed`` and its
relative path, so adding or removing files never changes the others. The same seed always gives
byte-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


class InputError(Exception):
    """An input that cannot be processed (missing, undecodable, no fundus)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "degrade",
        help="synthesise degraded fundus photographs (Cofe-Net model), reproducibly",
        description="Degrade a photograph or every photograph under a folder (jpg, jpeg, png, tif, tiff), "
        "writing <stem>.png and <stem>.json (sampled parameters and seed).",
    )
    parser.add_argument("input", metavar="IN", type=Path, help="image file or folder (searched recursively)")
    parser.add_argument("output", metavar="OUT", type=Path, help="output PNG path or folder")
    parser.add_argument("--seed", type=int, required=True, help="random seed (per-file seeds derive from it)")
    parser.add_argument(
        "--types",
        default=None,
        help="comma-separated subset of illumination,spot,blur (default: a random subset per image)",
    )
    parser.add_argument("--mode", choices=("cofe", "paper"), default="cofe", help="degradation constants")
    parser.add_argument("--size", type=int, default=512, help="working size in pixels (default 512)")
    parser.set_defaults(func=run)


def file_seed(base_seed: int, relative_path: str) -> int:
    """Deterministic 63-bit seed for one file of a folder, from the base seed and its relative path."""
    digest = hashlib.sha256(f"{base_seed}\0{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _read_rgb(path: Path) -> Any:
    import cv2
    import numpy as np

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot decode {path} as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def degrade_file(
    source: Path, target: Path, *, seed: int, types: list[str] | None, mode: str, size: int
) -> dict[str, Any]:
    """Degrade one photograph into ``target`` (PNG) and its ``.json`` sibling; returns the JSON record."""
    import cv2
    import numpy as np
    import torch

    from model.degradation import degrade_image
    from model.fov import FovNotFound, plan_crop, to_working, working_fov_mask
    from model.fov_detect import detect_fov

    rgb = _read_rgb(source)
    try:
        circle = detect_fov(rgb)
    except FovNotFound as exc:
        raise InputError(f"{source}: {exc}") from exc
    crop = plan_crop(circle, rgb.shape[0], rgb.shape[1], working_size=size)
    working = to_working(rgb, crop)
    image = torch.from_numpy(working).permute(2, 0, 1).float().div(255)
    fov = torch.from_numpy(working_fov_mask(crop))[None]
    degraded, params = degrade_image(image, fov, seed=seed, types=types, mode=mode)
    pixels = degraded.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    target.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[:, :, ::-1]))
    if not ok:
        raise InputError(f"cannot encode the output for {source}")
    target.write_bytes(encoded.tobytes())
    record = {
        "seed": seed,
        "params": params,
        "fov": {"cx": circle.cx, "cy": circle.cy, "radius": circle.radius},
        "crop": {"x0": crop.x0, "y0": crop.y0, "side": crop.side, "size": crop.size},
        "source_size": [int(rgb.shape[0]), int(rgb.shape[1])],
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _jobs(source: Path, output: Path, seed: int) -> list[tuple[Path, Path, int]]:
    """``(input, output PNG, seed)`` for a file or for every image under a folder (sorted, recursive)."""
    if source.is_file():
        target = output / f"{source.stem}.png" if output.is_dir() else output.with_suffix(".png")
        return [(source, target, seed)]
    output_root = output.resolve()
    files = sorted(
        path
        for path in source.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and output_root not in path.resolve().parents
    )
    jobs = []
    for path in files:
        relative = path.relative_to(source)
        jobs.append((path, (output / relative).with_suffix(".png"), file_seed(seed, relative.as_posix())))
    return jobs


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201
    return 2


def run(args: argparse.Namespace) -> int:
    from model.degradation import ALL_TYPES

    types = None
    if args.types is not None:
        types = [name.strip() for name in args.types.split(",") if name.strip()]
        unknown = sorted(set(types) - set(ALL_TYPES))
        if unknown or not types:
            return _fail(f"--types must be a comma-separated subset of {','.join(ALL_TYPES)}")
    if args.size < 64 or args.size % 8:
        return _fail("--size must be a multiple of 8 and at least 64")
    if not args.input.exists():
        return _fail(f"input not found: {args.input}")
    jobs = _jobs(args.input, args.output, args.seed)
    if not jobs:
        return _fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.input}")
    failures = 0
    for source, target, seed in jobs:
        try:
            degrade_file(source, target, seed=seed, types=types, mode=args.mode, size=args.size)
        except InputError as exc:
            failures += 1
            _fail(str(exc))
    done = len(jobs) - failures
    print(f"degraded {done} of {len(jobs)} image(s) into {args.output}")  # noqa: T201
    return 2 if failures else 0
