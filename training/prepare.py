"""One-off preparation of working-size images: FOV crop, resize, masks transformed identically.

Every photograph is FOV-detected, cropped to a square around its field of view and resized to the
working size once; the vessel and FOV masks go through the same crop. Pixels outside the FOV are
zeroed, which also removes burned-in text in the corners. Results are cached as PNG files under
``<cache_dir>/<size>/<set>/``, written atomically, so several processes (DDP ranks, DataLoader
workers) can share one cache.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model.fov import FovCircle, FovNotFound, plan_crop, to_working, working_fov_mask
from model.fov_detect import estimate_fov
from training.sources import ImageRecord


@dataclass
class WorkingImage:
    """A working-size sample.

    Attributes:
        image: (S, S, 3) uint8 RGB, zero outside the FOV.
        fov: (S, S) uint8 in {0, 1}.
        vessel: (S, S) uint8 in {0, 1}, or None without a manual mask.
    """

    image: np.ndarray
    fov: np.ndarray
    vessel: np.ndarray | None


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; ``ValueError`` if it cannot be decoded."""
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise ValueError(f"cannot decode image {path.name}")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 in {0, 1} of a 0/255 mask file (threshold 128)."""
    data = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ValueError(f"cannot decode mask {path.name}")
    return (data >= 128).astype(np.uint8)


def _warp_mask(mask: np.ndarray, crop: object, shape: tuple[int, int]) -> np.ndarray:
    """Send an (H, W) {0,1} mask through the same crop as its image; (S, S) {0,1}."""
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (to_working((mask * 255).astype(np.uint8), crop) >= 128).astype(np.uint8)


def find_fov(image: np.ndarray) -> FovCircle:
    """The FOV circle the service would use (fitted or fallback), or the inscribed circle.

    The data sets hold fundus photographs only, so an image the detector would refuse (very dark,
    say) is still used, with the inscribed circle keeping its centre.
    """
    try:
        return estimate_fov(image).circle
    except FovNotFound:
        h, w = image.shape[:2]
        return FovCircle(cx=(w - 1) / 2, cy=(h - 1) / 2, radius=min(h, w) / 2)


def make_working(
    image: np.ndarray, size: int, vessel: np.ndarray | None = None, fov: np.ndarray | None = None
) -> WorkingImage:
    """FOV-crop and resize an (H, W, 3) RGB photograph and its optional masks to (size, size)."""
    h, w = image.shape[:2]
    crop = plan_crop(find_fov(image), h, w, size)
    work = to_working(image, crop)
    disk = (working_fov_mask(crop) >= 0.5).astype(np.uint8)
    fov_work = disk if fov is None else (_warp_mask(fov, crop, (h, w)) & disk)
    vessel_work = None if vessel is None else _warp_mask(vessel, crop, (h, w)) & fov_work
    return WorkingImage(work, fov_work, vessel_work)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread: the cache is filled by several of each.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp.png")
    if not cv2.imwrite(str(tmp), array):
        raise OSError(f"cannot write {path}")
    os.replace(tmp, path)


class WorkingCache:
    """Working-size copies of records, prepared on first use and then read from PNG files.

    Args:
        cache_dir: root of the cache.
        size: working size S.
    """

    def __init__(self, cache_dir: str | Path, size: int) -> None:
        self.root = Path(cache_dir) / str(size)
        self.size = size

    def _paths(self, record: ImageRecord) -> tuple[Path, Path, Path]:
        folder = self.root / record.set.replace(":", "_").replace("/", "_")
        return (
            folder / f"{record.stem}.png",
            folder / f"{record.stem}.fov.png",
            folder / f"{record.stem}.vessel.png",
        )

    def ensure(self, record: ImageRecord) -> None:
        """Prepare and store ``record`` unless it is already cached."""
        image_path, fov_path, vessel_path = self._paths(record)
        if image_path.is_file() and fov_path.is_file() and (record.vessel is None or vessel_path.is_file()):
            return
        work = make_working(
            read_rgb(record.image),
            self.size,
            read_mask(record.vessel) if record.vessel else None,
            read_mask(record.fov) if record.fov else None,
        )
        if work.vessel is not None:
            _write_png(vessel_path, work.vessel * 255)
        _write_png(fov_path, work.fov * 255)
        _write_png(image_path, cv2.cvtColor(work.image, cv2.COLOR_RGB2BGR))

    def load(self, record: ImageRecord) -> WorkingImage:
        """The cached working sample of ``record`` (prepared if needed)."""
        self.ensure(record)
        image_path, fov_path, vessel_path = self._paths(record)
        vessel = read_mask(vessel_path) if record.vessel is not None else None
        return WorkingImage(read_rgb(image_path), read_mask(fov_path), vessel)


def pseudo_mask_path(folder: str | Path, record: ImageRecord) -> Path:
    """Where the pseudo vessel mask of ``record`` lives inside a pseudo-mask folder."""
    return Path(folder) / record.set.replace(":", "_").replace("/", "_") / f"{record.stem}.png"


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Atomically write an (S, S) {0,1} mask as a 0/255 PNG."""
    _write_png(path, (mask > 0).astype(np.uint8) * 255)
