"""Codec conversions: 16-bit, gray, RGBA, CMYK, EXIF orientation, TIFF; sniffing and the pixel limit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.codecs import EncodeContext, ImageTooLarge, UndecodableImage, default_registry
from tests.service.conftest import encode

REGISTRY = default_registry()
CONTEXT = EncodeContext(task="enhance", model_version="test")


def decode(fmt: str, data: bytes, max_pixels: int = 10**8):
    codec = REGISTRY.by_format(fmt)
    assert codec is not None
    return codec.decode(data, max_pixels=max_pixels)


def test_sixteen_bit_gray_png_is_rescaled_not_truncated() -> None:
    gray = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
    decoded = decode("png", encode(gray))
    assert decoded.mode.startswith("I;16") and decoded.bit_depth == 16
    assert decoded.pixels.shape == (48, 64, 3) and decoded.pixels.dtype == np.uint8
    expected = np.round(gray / 257.0).astype(np.uint8)
    assert np.abs(decoded.pixels[:, :, 1].astype(int) - expected).max() <= 1
    assert decoded.pixels[-1, -1, 0] == 255


def test_sixteen_bit_rgb_tiff() -> None:
    rgb = (np.arange(32 * 32 * 3, dtype=np.uint32).reshape(32, 32, 3) * 61 % 65536).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb, photometric="rgb")
    decoded = decode("tiff", buffer.getvalue())
    assert decoded.bit_depth == 16 and decoded.pixels.shape == (32, 32, 3)
    assert np.abs(decoded.pixels.astype(int) - np.round(rgb / 257.0)).max() <= 1


def test_gray_and_palette_become_rgb() -> None:
    gray = np.full((20, 30), 77, dtype=np.uint8)
    decoded = decode("png", encode(gray))
    assert decoded.mode == "L" and (decoded.pixels == 77).all() and decoded.pixels.shape == (20, 30, 3)
    palette = Image.fromarray(np.full((20, 30, 3), (10, 200, 30), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert tuple(decode("png", buffer.getvalue()).pixels[5, 5]) == (10, 200, 30)


def test_rgba_is_composited_on_black() -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :5, 3] = 255
    rgba[:, 5:, 3] = 0
    pixels = decode("png", encode(rgba)).pixels
    assert (pixels[:, :5] == 200).all() and (pixels[:, 5:] == 0).all()


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    image = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # red
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    decoded = decode("jpeg", buffer.getvalue())
    assert decoded.mode == "CMYK" and decoded.pixels.shape == (30, 40, 3)
    red, green, blue = decoded.pixels[15, 20].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_jpeg_exif_orientation_is_applied() -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif, quality=95)
    pixels = decode("jpeg", buffer.getvalue()).pixels
    assert pixels.shape == (40, 20, 3)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 0] < 50  # the white half is now on top


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(ImageTooLarge):
        decode("png", encode(np.zeros((100, 100, 3), np.uint8)), max_pixels=9_999)


def test_corrupt_data_is_undecodable() -> None:
    with pytest.raises(UndecodableImage):
        decode("jpeg", encode(np.zeros((50, 50, 3), np.uint8), "JPEG")[:-300][:300])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff"])
def test_sniffing_and_encode_round_trip(fmt: str) -> None:
    codec = REGISTRY.by_format(fmt)
    assert codec is not None
    pixels = np.random.default_rng(0).integers(0, 255, (24, 36, 3), dtype=np.uint8)
    data = codec.encode(pixels, original=None, context=CONTEXT)
    assert REGISTRY.sniff(data[:512]) is codec
    back = codec.decode(data, max_pixels=10**6).pixels
    assert back.shape == pixels.shape
    if fmt != "jpeg":
        assert np.array_equal(back, pixels)
    gray = codec.encode(pixels[:, :, 0], original=None, context=CONTEXT)
    assert Image.open(io.BytesIO(gray)).mode == "L"


def test_registry_aliases_and_unknown_types() -> None:
    assert REGISTRY.by_media_type("image/jpg; charset=x") is REGISTRY.by_format("jpeg")
    assert REGISTRY.by_media_type("image/gif") is None
    assert REGISTRY.sniff(b"GIF89a....") is None
