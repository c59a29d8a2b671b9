"""Do no harm on good photographs: how much the model changes photographs that need no enhancement.

The synthetic evaluation scores a clean photograph through the model only for the test split's
cameras. A restorer can leave those alone and still alter another camera's good photographs (its
colour, texture or the dark macula read as a fault). ``fundus eval --good-photos PATH ...`` takes good
photographs of the cameras in use (files, or folders of them) and reports, per photograph and per
folder, the PSNR of the model's answer against the photograph itself inside its field of view: at the
working size and at the photograph's own geometry through the service's restore path. 30 dB and
above is "left alone" (differences of about 3 % of the intensity range at most, on average).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.fov import fov_mask, working_fov_mask
from model.restore import enhanced_to_input, working_view
from training.metrics import image_tensor, psnr
from training.prepare import read_rgb
from training.sources import list_images

log = logging.getLogger("training")

#: A good photograph through the model must stay at least this close to itself (dB).
LEFT_ALONE_DB = 30.0

#: Enhance a (S, S, 3) uint8 working image → (S, S, 3) uint8, as the service's model worker does.
EnhanceFn = Callable[[np.ndarray], np.ndarray]


def good_photo_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Image files among ``paths``: files as given, folders by the images directly in them (sorted);
    ``ValueError`` when a path does not exist, a folder holds no image or nothing is given."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            images = list_images(entry)
            if not images:
                raise ValueError(f"--good-photos: no images directly in {entry}")
            found += images
        elif entry.is_file():
            found.append(entry)
        else:
            raise ValueError(f"--good-photos: {entry} does not exist")
    if not found:
        raise ValueError("--good-photos: no images given")
    return found


def camera_of(path: Path) -> str:
    """A group name for ``path``: its folder, or the folder above an ``images`` folder."""
    parent = path.parent
    return parent.parent.name if parent.name == "images" and parent.parent.name else parent.name


def score_good_photo(path: Path, enhance: EnhanceFn, size: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """PSNR (dB, 100 = unchanged) of the model's answer against the photograph, in its FOV.

    ``psnr_working``: the ``size``² working image; ``psnr_native``: the (H, W, 3) photograph through the
    service's restore path (FOV crop, network, transfer back). Also returns the working-size panels
    input | answer, for looking at what changed.
    """
    pixels = read_rgb(path)
    view = working_view(pixels, size)
    answer = enhance(view.working)
    inside_working = torch.from_numpy(working_fov_mask(view.crop) >= 0.5)
    restored = enhanced_to_input(view, pixels, answer)
    inside_native = torch.from_numpy(fov_mask(*pixels.shape[:2], view.crop.circle))
    row = {
        "image": str(path),
        "camera": camera_of(path),
        "psnr_working": psnr(image_tensor(answer), image_tensor(view.working), inside_working),
        "psnr_native": psnr(image_tensor(restored), image_tensor(pixels), inside_native),
    }
    return row, [view.working, answer]


def summarise_good(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per camera and overall: count, worst and median PSNR and the share left alone, both sizes."""

    def stats(group: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"photos": len(group)}
        for key in ("psnr_working", "psnr_native"):
            values = np.array([r[key] for r in group], dtype=np.float64)
            out[f"{key}_worst"] = float(values.min())
            out[f"{key}_median"] = float(np.median(values))
            out[f"{key}_left_alone"] = float(np.mean(values >= LEFT_ALONE_DB))
        return out

    cameras = sorted({r["camera"] for r in rows})
    return {
        "all": stats(rows),
        "cameras": {name: stats([r for r in rows if r["camera"] == name]) for name in cameras},
        "left_alone_db": LEFT_ALONE_DB,
    }


def evaluate_good_photos(
    paths: list[Path],
    enhance: EnhanceFn,
    size: int,
    save_panels: Callable[[int, list[np.ndarray]], str] | None = None,
) -> dict[str, Any]:
    """Scores of every photograph plus :func:`summarise_good`; ``save_panels(index, panels)`` stores
    each photograph's input | answer picture and returns its name (kept as the row's ``grid``)."""
    rows = []
    for index, path in enumerate(paths):
        row, panels = score_good_photo(path, enhance, size)
        if save_panels is not None:
            row["grid"] = save_panels(index, panels)
        rows.append(row)
        log.info("good photo %d/%d", index + 1, len(paths))
    return {"summary": summarise_good(rows), "photos": rows}
