"""Answers keep the input's format: gray in → gray out, 16 bits in → 16 bits out (PNG, TIFF)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import encode, fundus_array


def _gray_fundus() -> np.ndarray:
    return cv2.cvtColor(fundus_array(200, 160), cv2.COLOR_RGB2GRAY)


@pytest.mark.parametrize(
    ("fmt", "media"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("TIFF", "image/tiff")]
)
@pytest.mark.parametrize("path", ["/enhance", "/degrade?seed=5"])
def test_gray_in_gray_out(client: TestClient, fmt: str, media: str, path: str) -> None:
    body = encode(_gray_fundus(), fmt)
    fmt_query = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff"}[fmt]
    response = client.post(f"{path}{'&' if '?' in path else '?'}format={fmt_query}", content=body,
                           headers={"content-type": media})  # fmt: skip
    assert response.status_code == 200, response.text
    answer = Image.open(io.BytesIO(response.content))
    assert answer.mode == "L", answer.mode


def _wide_fundus(channels: int) -> np.ndarray:
    """A 16-bit fundus-like image whose low bytes carry information (not an 8-bit image × 257)."""
    rgb = fundus_array(200, 160).astype(np.uint32) * 257
    rng = np.random.default_rng(1)
    rgb = np.clip(rgb + rng.integers(0, 200, rgb.shape), 0, 65535).astype(np.uint16)
    rgb[fundus_array(200, 160).max(axis=2) == 0] = 7  # a dark, not black, 16-bit background
    return rgb if channels == 3 else rgb[:, :, 0].copy()


def _png16(array: np.ndarray) -> bytes:
    image = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _read16(data: bytes) -> np.ndarray:
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return tifffile.imread(io.BytesIO(data))
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB) if decoded.ndim == 3 else decoded


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("container", ["png", "tiff"])
def test_sixteen_bits_in_sixteen_bits_out(client: TestClient, channels: int, container: str) -> None:
    wide = _wide_fundus(channels)
    if container == "png":
        body, media = _png16(wide), "image/png"
    else:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, wide, photometric="rgb" if channels == 3 else "minisblack")
        body, media = buffer.getvalue(), "image/tiff"
    for path in ("/enhance", "/degrade?seed=3&types=illumination"):
        response = client.post(path, content=body, headers={"content-type": media})
        assert response.status_code == 200, response.text
        answer = _read16(response.content)
        assert answer.dtype == np.uint16 and answer.shape == wide.shape, (answer.dtype, answer.shape)
        outside = fundus_array(200, 160).max(axis=2) == 0  # the background, left alone by the model
        outside = cv2.erode(outside.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        assert np.array_equal(answer[outside], wide[outside])  # exact 16-bit values, low bytes too
        assert not np.array_equal(answer, wide)
