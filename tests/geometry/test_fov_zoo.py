"""Field-of-view estimation across cameras: every photograph of the data pack, re-rendered the way
other cameras and workflows deliver them (tests/geometry/zoo.py), is accepted, with the fitted
circle where the geometry is known; images that are clearly not fundus photographs are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.fov import FovCircle, FovNotFound, fov_mask
from model.fov_detect import NotFundus, estimate_fov
from tests.geometry.zoo import VARIATIONS, random_variations, read_rgb, render, source_circle

SETS = ("hrf", "chase_db1", "fives", "idrid", "deepdrid")
#: DeepDRiD's fields are ellipses (the copy was squeezed to a square), so their circle is not known.
KNOWN_GEOMETRY = ("hrf", "chase_db1", "fives", "idrid")
RADIUS_TOLERANCE = 0.03


def _photographs(data_root: Path) -> Iterator[tuple[str, Path]]:
    for name in SETS:
        for path in sorted((data_root / name / "images").glob("*.jpg")):
            yield name, path


def _fov_mask_file(path: Path) -> np.ndarray | None:
    mask_path = path.parent.parent / "fov" / f"{path.stem}.png"
    return cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.is_file() else None


def _radius_error(found: FovCircle, truth: FovCircle) -> float:
    return abs(found.radius - truth.radius) / truth.radius


def test_every_photograph_plain_and_in_a_random_camera_style(data_root: Path) -> None:
    """All 1,073 photographs unmodified, and each once more with 2–4 random variations at a random
    size from 256 to 1,600 pixels: no refusal; fitted circles within 3 % of the known radius."""
    rng = np.random.default_rng(2024)
    refused: list[str] = []
    off: list[str] = []
    fitted = known = 0
    count = 0
    for name, path in _photographs(data_root):
        photo = read_rgb(path)
        try:
            plain = estimate_fov(photo)
        except FovNotFound as exc:
            refused.append(f"{path.name}: {exc}")
            continue
        truth_source = source_circle(photo, _fov_mask_file(path))
        if name == "hrf":
            assert plain.method == "fitted"
            assert _radius_error(plain.circle, truth_source) < 0.01, path.name
        variations = random_variations(rng, int(rng.integers(2, 5)))
        size = int(rng.integers(256, 1601))
        case = render(photo, truth_source, variations, size, seed=count, name=path.name)
        count += 1
        try:
            found = estimate_fov(case.image)
        except FovNotFound as exc:
            refused.append(f"{case.name}: {exc}")
            continue
        if case.circle is not None and name in KNOWN_GEOMETRY:
            known += 1
            if found.method == "fitted":
                fitted += 1
                if _radius_error(found.circle, case.circle) > RADIUS_TOLERANCE:
                    off.append(f"{case.name}: {_radius_error(found.circle, case.circle):.3f}")
    assert count == 1073
    assert not refused, refused
    assert not off, off
    assert fitted >= 0.85 * known, (fitted, known)


@pytest.mark.parametrize("variation", VARIATIONS)
def test_each_variation_alone_at_several_sizes(variation: str, data_root: Path) -> None:
    """Two photographs of each set, this variation alone, at 256, 900 and 2,000 pixels: no refusal;
    fitted circles within 3 % of the known radius, and fitted in at least 80 % of the cases where
    the geometry is known. (HRF and IDRiD fields are already clipped top and bottom by their own
    frames; clipped again from the sides, only short arcs at the corners are left, and a fallback
    is the honest answer there.)"""
    refused: list[str] = []
    off: list[str] = []
    fitted = known = 0
    for name in SETS:
        paths = sorted((data_root / name / "images").glob("*.jpg"))
        for index, path in enumerate(paths[:: max(1, len(paths) // 2)][:2]):
            photo = read_rgb(path)
            source = source_circle(photo, _fov_mask_file(path))
            for size in (256, 900, 2000):
                case = render(photo, source, (variation,), size, seed=index * 10 + size, name=path.name)
                try:
                    found = estimate_fov(case.image)
                except FovNotFound as exc:
                    refused.append(f"{case.name}: {exc}")
                    continue
                if variation == "tight":
                    # No background at all: (nearly) the whole frame is the field of view.
                    covered = fov_mask(*case.image.shape[:2], found.circle).mean()
                    assert covered > 0.95, (case.name, found.method, covered)
                elif case.circle is not None and name in KNOWN_GEOMETRY:
                    known += 1
                    if found.method == "fitted":
                        fitted += 1
                        if _radius_error(found.circle, case.circle) > RADIUS_TOLERANCE:
                            off.append(f"{case.name}: {_radius_error(found.circle, case.circle):.3f}")
    assert not refused, refused
    assert not off, off
    assert fitted >= 0.8 * known, (fitted, known)


def test_the_largest_sizes() -> None:
    """Mydriatic-camera sizes (5,000 pixels) with a clipped circle, synthetic disc."""
    height, width = 3300, 5000
    truth = FovCircle(cx=2500.0, cy=1650.0, radius=1900.0)
    ys, xs = np.ogrid[:height, :width]
    inside = (xs - truth.cx) ** 2 + (ys - truth.cy) ** 2 <= truth.radius**2
    image = np.zeros((height, width, 3), np.uint8)
    shade = np.clip(1.0 - 0.5 * ((xs - truth.cx) ** 2 + (ys - truth.cy) ** 2) / truth.radius**2, 0.3, 1.0)
    image[..., 0] = (180 * shade * inside).astype(np.uint8)
    image[..., 1] = (70 * shade * inside).astype(np.uint8)
    image[..., 2] = (25 * shade * inside).astype(np.uint8)
    found = estimate_fov(image)
    assert found.method == "fitted" and found.confidence >= 0.5
    assert _radius_error(found.circle, truth) < 0.01


def _rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def _negatives() -> dict[str, np.ndarray]:
    """Images that are clearly not fundus photographs."""
    from skimage import data

    samples = (
        "astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "horse", "rocket",
        "hubble_deep_field", "immunohistochemistry", "text", "clock", "checkerboard", "grass",
        "gravel", "brick", "cell", "colorwheel", "logo", "cat",
    )  # fmt: skip
    images = {name: _rgb(getattr(data, name)()) for name in samples}
    rng = np.random.default_rng(0)
    images["noise"] = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    images["grey noise"] = np.repeat(rng.integers(0, 256, (400, 500, 1), dtype=np.uint8), 3, axis=2)
    for value in (0, 128, 255):
        images[f"flat {value}"] = np.full((300, 400, 3), value, np.uint8)
    images["flat orange"] = np.full((300, 400, 3), (200, 100, 50), np.uint8)
    document = np.full((600, 450, 3), 250, np.uint8)
    for row in range(14):
        cv2.putText(document, "The quick brown fox jumps", (20, 40 + 40 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                    (20, 20, 20), 2)  # fmt: skip
    images["document"] = document
    screenshot = np.full((500, 800, 3), 240, np.uint8)
    cv2.rectangle(screenshot, (0, 0), (800, 40), (50, 80, 160), -1)
    for row in range(8):
        cv2.putText(screenshot, f"Settings item {row}", (30, 100 + 45 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                    (0, 0, 0), 1)  # fmt: skip
    images["screenshot"] = screenshot
    images["face"] = np.ascontiguousarray(images["astronaut"][20:220, 140:320])
    images["cat face"] = np.ascontiguousarray(images["chelsea"][30:250, 120:330])
    return images


def test_images_that_are_not_fundus_photographs_are_refused() -> None:
    negatives = _negatives()
    accepted = []
    for name, image in negatives.items():
        try:
            estimate_fov(image)
            accepted.append(name)
        except NotFundus:
            pass
    assert len(accepted) <= 0.05 * len(negatives), accepted


def test_a_fundus_from_another_collection_is_fitted() -> None:
    """scikit-image's retina sample: another camera, not in the data pack."""
    from skimage import data

    image = _rgb(data.retina())
    found = estimate_fov(image)
    assert found.method == "fitted" and found.confidence > 0.8
    assert 0.45 * image.shape[0] < found.circle.radius < 0.52 * image.shape[0]


def test_full_mode_skips_detection() -> None:
    found = estimate_fov(np.zeros((50, 80, 3), np.uint8), mode="full")
    assert found.method == "full" and found.confidence == 0.0
    assert fov_mask(50, 80, found.circle).all()
    with pytest.raises(ValueError, match="mode"):
        estimate_fov(np.zeros((50, 80, 3), np.uint8), mode="circle")  # type: ignore[arg-type]
