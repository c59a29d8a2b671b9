"""The libpng fast path of PNG decoding gives exactly what the Pillow path gives, and only where safe."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.codecs import EncodeContext, UndecodableImage
from service.codecs.base import Codec
from service.codecs.raster import PillowCodec, PngCodec, plain_png
from tests.service.conftest import fundus_array


def png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pillow_decode(codec: Codec, data: bytes) -> tuple[np.ndarray, str, int]:
    decoded = PillowCodec.decode(codec, data, max_pixels=10**8)  # type: ignore[arg-type]
    return decoded.pixels, decoded.mode, decoded.bit_depth


RGB = fundus_array(97, 61, seed=3)


@pytest.mark.parametrize(
    "data",
    [
        png(Image.fromarray(RGB)),
        png(Image.fromarray(RGB), optimize=True),
        png(Image.fromarray(RGB[:, :, 1])),
        png(Image.fromarray(RGB), dpi=(300, 300)),
        png(Image.fromarray(RGB)) + b"trailing bytes after IEND",
    ],
    ids=["rgb", "rgb-optimized", "gray", "with-pHYs", "trailing-bytes"],
)
def test_fast_path_matches_pillow(data: bytes) -> None:
    codec = PngCodec()
    assert plain_png(data) is not None
    decoded = codec.decode(data, max_pixels=10**8)
    pixels, mode, depth = pillow_decode(codec, data)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert (decoded.mode, decoded.bit_depth, decoded.samples16) == (mode, depth, None)


def test_exif_text_alpha_palette_and_16_bit_go_through_pillow() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "anything")
    cases = [
        png(Image.fromarray(RGB), exif=exif.tobytes()),
        png(Image.fromarray(RGB), pnginfo=text),
        png(Image.fromarray(RGB).convert("RGBA")),
        png(Image.fromarray(RGB).convert("P")),
        png(Image.fromarray(RGB[:, :, 0].astype(np.uint16) * 257).convert("I;16")),
    ]
    codec = PngCodec()
    for data in cases:
        assert plain_png(data) is None
        decoded = codec.decode(data, max_pixels=10**8)
        np.testing.assert_array_equal(decoded.pixels, pillow_decode(codec, data)[0])
    rotated = codec.decode(cases[0], max_pixels=10**8)
    assert rotated.pixels.shape[:2] == (RGB.shape[1], RGB.shape[0])  # the orientation was applied


def test_truncated_and_corrupt_files_are_still_refused() -> None:
    data = png(Image.fromarray(RGB))
    codec = PngCodec()
    truncated = data[: len(data) // 2]
    assert plain_png(truncated) is None
    with pytest.raises(UndecodableImage):
        codec.decode(truncated, max_pixels=10**8)
    idat = data.index(b"IDAT")
    corrupt = data[: idat + 20] + bytes(b ^ 0xFF for b in data[idat + 20 : idat + 60]) + data[idat + 60 :]
    with pytest.raises(UndecodableImage):
        codec.decode(corrupt, max_pixels=10**8)


@pytest.mark.parametrize(
    "pixels",
    [RGB, RGB[::2, 5:], fundus_array(1, 1, seed=4), fundus_array(513, 511, seed=5)],
    ids=["rgb", "strided-view", "one-pixel", "odd-size"],
)
def test_rgb_answers_are_exact_and_read_back_on_the_fast_path(pixels: np.ndarray) -> None:
    """The RGB writer's files hold exactly the pixels for any decoder, and our own answers posted
    back (a /degrade result sent to /enhance) decode on the libpng fast path."""
    codec = PngCodec()
    data = codec.encode(pixels, original=None, context=EncodeContext(task="enhance", model_version="t"))
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)
    assert plain_png(data) == (pixels.shape[1], pixels.shape[0], True)
    np.testing.assert_array_equal(codec.decode(data, max_pixels=10**8).pixels, pixels)
