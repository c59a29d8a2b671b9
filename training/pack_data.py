"""A self-contained copy of the photographs one training config uses, for a machine without the data.

A rented GPU machine often receives only what is sent along with the code, within a few tens of
megabytes. ``python -m training.pack_data --config training/configs/gpu.yaml --out .pack`` copies
every image and mask that :func:`training.sources.build_split` gives a role (training, validation
and the fixed test split, which the run's final evaluation needs) into
``<out>/<set>/{images,vessels,fov}/`` under their own names, with ``splits.json`` and the rows of each
``quality.csv`` that belong to copied photographs. Photographs the config does not use (DeepDRiD's
good half in the default recipe) stay behind. The split drawn from the copy is checked to equal the
split drawn from the original before the function returns, so a run on the copy trains, validates
and tests on the same photographs.

Files are copied byte for byte. With ``max_mb``, when the copy would be larger, the largest JPEG
photographs are re-encoded (``reencode_quality``) one by one until it fits; ``PACK.json`` lists
each with its size before and after and its PSNR against the original, so the change is on record.
Training reads photographs at a working size of 512² (a 2–3× area reduction of the data pack's
images), where a quality-90 re-encode is far below what the model can see.

Configs that name folders outside the data root (EyeQ, ``unlabeled_dirs``) are refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2

from training.config import DataConfig, load_config
from training.metrics import image_tensor, psnr
from training.sources import ImageRecord, Split, build_split

#: Description file written at the top of every pack.
PACK_FILE = "PACK.json"
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def _roles(split: Split) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.key, tuple(r.roles)) for r in split.records]


def _reencode(path: Path, quality: int) -> tuple[bytes, float] | None:
    """JPEG bytes of ``path`` at ``quality`` and their PSNR (dB) against the decoded original, or
    None when the original cannot be decoded."""
    original = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if original is None:
        return None
    ok, encoded = cv2.imencode(".jpg", original, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return None
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return encoded.tobytes(), psnr(image_tensor(decoded), image_tensor(original))


def _copy_records(records: Sequence[ImageRecord], root: Path, out: Path) -> list[Path]:
    """Copy each record's image and masks below ``out``, same relative paths; returns the images."""
    images = []
    for record in records:
        for source in (record.image, record.vessel, record.fov):
            if source is None:
                continue
            target = out / Path(source).relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        images.append(out / Path(record.image).relative_to(root))
    return images


def _copy_quality_tables(config: DataConfig, records: Sequence[ImageRecord], root: Path, out: Path) -> None:
    """The rows of each quality set's ``quality.csv`` whose photographs were copied."""
    for name in sorted(set(config.quality_sets) | set(config.quality_clean_sets)):
        source = root / name / "quality.csv"
        if not source.is_file():
            continue
        kept = {r.stem for r in records if r.set == name}
        with source.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("stem") in kept]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "quality.csv").write_text(buffer.getvalue())


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _fit(images: Sequence[Path], out: Path, budget: int, quality: int) -> list[dict[str, Any]]:
    """Re-encode the largest JPEG photographs until the pack is at most ``budget`` bytes."""
    total = _size(out)
    changed: list[dict[str, Any]] = []
    candidates = sorted(
        (p for p in images if p.suffix.lower() in _JPEG_SUFFIXES),
        key=lambda p: p.stat().st_size,
        reverse=True,
    )
    for path in candidates:
        if total <= budget:
            break
        result = _reencode(path, quality)
        before = path.stat().st_size
        if result is None or len(result[0]) >= before:
            continue
        path.write_bytes(result[0])
        total -= before - len(result[0])
        changed.append(
            {
                "path": str(path.relative_to(out)),
                "bytes_before": before,
                "bytes_after": len(result[0]),
                "psnr_db": round(result[1], 2),
            }
        )
    if total > budget:
        raise ValueError(
            f"the pack needs {total / 1e6:.1f} MB even with every JPEG re-encoded at quality {quality}; "
            f"the limit is {budget / 1e6:.1f} MB (use fewer sets or limit_per_set)"
        )
    return changed


def pack_data(
    config: DataConfig, out: Path, *, max_mb: float = 0.0, reencode_quality: int = 90
) -> dict[str, Any]:
    """Copy what ``config`` uses into ``out`` (see the module docstring); returns ``PACK.json``'s content.

    Raises:
        ValueError: ``out`` is not empty, the config reads folders outside its root, or the pack
            cannot fit ``max_mb``.
        RuntimeError: the split drawn from the pack differs from the original's.
    """
    if config.eyeq_images or config.unlabeled_dirs:
        raise ValueError("configs that read EyeQ or unlabeled_dirs outside the data root cannot be packed")
    if not 1 <= reencode_quality <= 100:
        raise ValueError("reencode_quality must be within 1..100")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    root = Path(config.root)
    split = build_split(config)
    out.mkdir(parents=True, exist_ok=True)
    try:
        images = _copy_records(split.records, root, out)
        if (root / "splits.json").is_file():
            shutil.copyfile(root / "splits.json", out / "splits.json")
        _copy_quality_tables(config, split.records, root, out)
        changed = _fit(images, out, int(max_mb * 1e6), reencode_quality) if max_mb > 0 else []
        if _roles(build_split(replace(config, root=str(out)))) != _roles(split):
            raise RuntimeError("the split drawn from the pack differs from the original's")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made pack that a rerun would refuse
        raise
    psnrs = [c["psnr_db"] for c in changed]
    summary: dict[str, Any] = {
        "source": str(root),
        "images": len(images),
        "bytes": _size(out),
        "roles": split.counts(),
        "reencode_quality": reencode_quality,
        "reencoded": changed,
        "reencoded_psnr_db_min": min(psnrs) if psnrs else None,
    }
    (out / PACK_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.pack_data",
        description="copy the photographs a training config uses into one folder (see the module docstring)",
    )
    parser.add_argument("--config", required=True, help="training YAML whose data section is packed")
    parser.add_argument("--out", required=True, help="new or empty folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--max-mb", type=float, default=0.0, help="size limit in MB (0 = none)")
    parser.add_argument("--reencode-quality", type=int, default=90, help="JPEG quality used to fit the limit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        summary = pack_data(
            config.data, Path(args.out), max_mb=args.max_mb, reencode_quality=args.reencode_quality
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 2
    brief = {k: v for k, v in summary.items() if k != "reencoded"} | {"reencoded": len(summary["reencoded"])}
    print(json.dumps(brief, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
