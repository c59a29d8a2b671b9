"""Outside the field of view the answer is the input: enhanced images are blended into the input with
the photographed area, vessel maps stay dark on the rim and outside."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.artifact import load_artifact
from model.fov import FovCircle, from_working
from model.restore import enhanced_to_input, vessels_to_input, working_view
from tests.geometry.zoo import read_rgb

BUNDLED = Path(__file__).resolve().parents[2] / "model" / "weights" / "tmagenet-lite.safetensors"
#: DeepDRiD photographs whose elliptical field of view leaves black caps inside the fitted circle.
ELLIPTICAL = ("100_r2", "102_l2", "107_r2", "112_r1")


def _outside(image: np.ndarray, margin: int = 3) -> np.ndarray:
    """Background pixels: black (JPEG noise aside), at least ``margin`` pixels from any picture."""
    picture = (image.max(axis=2) > 4).astype(np.uint8)
    return cv2.distanceTransform(1 - picture, cv2.DIST_L2, 3) > margin


@pytest.mark.parametrize("stem", ELLIPTICAL)
def test_no_band_outside_an_elliptical_field(stem: str, data_root: Path) -> None:
    """A result that differs everywhere (an olive working image, like the band users saw) changes
    no background pixel; mapped back by the circle alone it paints a band over the black caps."""
    photo = read_rgb(data_root / "deepdrid" / "images" / f"{stem}.jpg")
    view = working_view(photo, 512)
    olive = np.empty_like(view.working)
    olive[:] = (70, 75, 20)
    outside = _outside(photo)
    circle_only = from_working(olive, view.crop, photo, working_input=view.working)
    assert np.count_nonzero((circle_only != photo).any(axis=2) & outside) > 3000  # the band
    answer = enhanced_to_input(view, photo, olive)
    changed = (answer != photo).any(axis=2)
    # A few pixels where the hull of the picture bridges the camera's notch at the rim, no band.
    assert np.count_nonzero(changed & outside) <= 0.0005 * np.count_nonzero(outside)
    assert not (changed & _outside(photo, margin=6)).any()


@pytest.fixture(scope="module")
def bundled_model() -> torch.nn.Module:
    return load_artifact(BUNDLED).model.eval()


def _longest_hot_run_degrees(hot: np.ndarray, circle: FovCircle) -> int:
    """Longest run of consecutive 1° sectors (around the FOV centre, wrapping) holding a pixel of ``hot``."""
    ys, xs = np.nonzero(hot)
    sectors = np.zeros(360, dtype=bool)
    sectors[np.floor(np.degrees(np.arctan2(ys - circle.cy, xs - circle.cx))).astype(int) % 360] = True
    if sectors.all():
        return 360
    run = longest = 0
    for on in np.concatenate([sectors, sectors]):
        run = run + 1 if on else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize(
    "relative",
    [
        "idrid/images/IDRiD_005.jpg",
        "chase_db1/images/Image_05L.jpg",
        "hrf/images/05_g.jpg",
        "deepdrid/images/100_r2.jpg",
    ],
)
def test_vessel_map_is_dark_on_the_rim_and_outside(
    relative: str, data_root: Path, bundled_model: torch.nn.Module
) -> None:
    photo = read_rgb(data_root / relative)
    view = working_view(photo, 512)
    x = torch.from_numpy(view.working.transpose(2, 0, 1).copy()).float()[None] / 255
    with torch.inference_mode():
        probability = (bundled_model.vessels.predict(x)[0, 0] * 255 + 0.5).byte().numpy()
    vessels = vessels_to_input(view, photo, probability)
    circle = view.crop.circle
    ys, xs = np.mgrid[: photo.shape[0], : photo.shape[1]]
    radius = np.hypot(xs - circle.cx, ys - circle.cy) / circle.radius
    rim = (radius > 0.975) & (radius <= 1.0)
    interior = (radius > 0.85) & (radius < 0.95)
    assert vessels[rim].mean() <= vessels[interior].mean()
    # Vessels cross the rim, each within a few degrees; an arc drawn along the rim is a long run.
    assert _longest_hot_run_degrees(rim & (vessels > 127), circle) < 10, "bright arc along the FOV rim"
    assert vessels[radius > 1.01].max() == 0
    assert vessels[_outside(photo)].max() <= 3
    assert vessels[_outside(photo, margin=6)].max() == 0
