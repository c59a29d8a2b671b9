"""FOV handling over HTTP: photographs from other cameras are accepted and say how their field of
view was found (``X-FOV``), ``fov=full`` skips detection, and only non-fundus images get 422."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.geometry.zoo import ZooCase, read_rgb, render, source_circle
from tests.service.conftest import decode, encode

PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def film_camera_case(data_root: Path) -> ZooCase:
    """A photograph the way an older film camera delivers it: the circle clipped at top and bottom,
    a square notch, on a dark tinted background, with haze lifting the black level."""
    photo = read_rgb(data_root / "chase_db1" / "images" / "Image_07R.jpg")
    return render(photo, source_circle(photo, None), ("clip_tb", "notch", "tinted", "haze"), 700, seed=3)


@pytest.fixture(scope="module")
def film_camera_style(film_camera_case: ZooCase) -> bytes:
    return encode(film_camera_case.image)


@pytest.fixture(scope="module")
def tight_crop(data_root: Path) -> bytes:
    photo = read_rgb(data_root / "idrid" / "images" / "IDRiD_079.jpg")
    return encode(render(photo, source_circle(photo, None), ("tight",), 600, seed=1).image)


def _screenshot() -> bytes:
    image = np.full((300, 400, 3), 245, np.uint8)
    for row in range(6):
        cv2.putText(image, "Patient list", (10, 40 + 45 * row), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2)
    return encode(image)


@pytest.mark.parametrize("path", ["/enhance", "/segment", "/degrade?seed=3"])
def test_other_cameras_are_accepted_and_say_how(
    client: TestClient, film_camera_style: bytes, path: str
) -> None:
    response = client.post(path, content=film_camera_style, headers=PNG)
    assert response.status_code == 200, response.text
    assert response.headers["x-fov"] == "fitted"
    assert 0.5 <= float(response.headers["x-fov-confidence"]) <= 1.0
    assert decode(response.content).size == decode(film_camera_style).size


def test_a_photograph_without_background_falls_back(client: TestClient, tight_crop: bytes) -> None:
    response = client.post("/enhance", content=tight_crop, headers=PNG)
    assert response.status_code == 200, response.text
    assert response.headers["x-fov"] == "fallback"


def test_full_skips_detection_even_for_what_would_be_refused(client: TestClient) -> None:
    body = _screenshot()
    refused = client.post("/enhance", content=body, headers=PNG)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "no_fundus" and "fundus" in error["message"]
    forced = client.post("/enhance?fov=full", content=body, headers=PNG)
    assert forced.status_code == 200 and forced.headers["x-fov"] == "full"
    segmented = client.post("/segment?fov=full", content=body, headers=PNG)
    assert segmented.status_code == 200 and segmented.headers["x-fov"] == "full"


def test_unknown_fov_value_is_a_400(client: TestClient, film_camera_style: bytes) -> None:
    response = client.post("/enhance?fov=circle", content=film_camera_style, headers=PNG)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_degrade_keeps_the_input_outside_the_field_of_view(
    client: TestClient, film_camera_case: ZooCase, film_camera_style: bytes
) -> None:
    original = film_camera_case.image
    response = client.post("/degrade?seed=11&types=illumination", content=film_camera_style, headers=PNG)
    assert response.status_code == 200 and response.headers["x-fov"] == "fitted"
    degraded = np.asarray(decode(response.content).convert("RGB"))
    circle = film_camera_case.circle
    assert circle is not None
    ys, xs = np.mgrid[: original.shape[0], : original.shape[1]]
    background = np.hypot(xs - circle.cx, ys - circle.cy) > circle.radius + 3  # tinted and hazy
    assert background.any()
    assert np.array_equal(degraded[background], original[background])
    assert not np.array_equal(degraded[~background], original[~background])


def test_degrade_of_a_non_fundus_image_uses_the_whole_frame(client: TestClient) -> None:
    response = client.post("/degrade?seed=2&types=illumination", content=_screenshot(), headers=PNG)
    assert response.status_code == 200 and response.headers["x-fov"] == "none"
