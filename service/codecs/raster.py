"""PNG, JPEG and TIFF through Pillow: any stored mode in, 8-bit RGB out; 8-bit RGB or gray back.

Conversions on decode: 16-bit samples are rescaled to 8 bits (not truncated), gray is replicated to
three channels, alpha is composited on black (the fundus background), CMYK and palette images go
through Pillow's converters, and the EXIF orientation tag is applied so pixels are upright. PNG answers
are written through OpenCV's libpng with fast compression settings (the encode sits on every request's
path); the pixels are the same as Pillow would write.
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.codecs.base import Codec, DecodedImage, EncodeContext, ImageTooLarge, UndecodableImage

_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    IndexError,
    EOFError,
)


#: libpng settings for :meth:`PngCodec.encode`: zlib level 1, run-length strategy, "up" row filter
#: (the filter option exists in recent OpenCV only; older builds use libpng's default filtering).
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Rescale integer or float samples to uint8 by their nominal range (16-bit → /257)."""
    if values.dtype == np.uint8:
        return values
    if np.issubdtype(values.dtype, np.floating):
        top = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(values) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    wide = values.astype(np.int64)
    if int(wide.max(initial=0)) <= 255 and values.dtype.itemsize > 2:
        return np.clip(wide, 0, 255).astype(np.uint8)
    return ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB from any Pillow mode."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = "A" in image.getbands() or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        return ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


class PillowCodec(Codec):
    """Shared Pillow decode/encode; subclasses give the format, magic and save options."""

    pil_format: str

    def _bit_depth(self, data: bytes, image: Image.Image) -> int:
        return 16 if image.mode.startswith("I;16") or image.mode in ("I", "F") else 8

    def decode(self, data: bytes, *, max_pixels: int) -> DecodedImage:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=[self.pil_format])
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge("image dimensions exceed the pixel limit") from exc
        except _DECODE_ERRORS as exc:
            raise UndecodableImage(f"not a readable {self.format_name.upper()} file") from exc
        width, height = image.size
        if width <= 0 or height <= 0:
            raise UndecodableImage(
                f"{self.format_name.upper()} header declares an empty image ({width}×{height})"
            )
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        mode = image.mode
        depth = self._bit_depth(data, image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                image = ImageOps.exif_transpose(image)
                pixels = _rgb_pixels(image)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge("image dimensions exceed the pixel limit") from exc
        except (*_DECODE_ERRORS, KeyError, TypeError) as exc:
            raise UndecodableImage(f"{self.format_name.upper()} data is truncated or corrupt") from exc
        return DecodedImage(pixels=pixels, media_type=self.media_type, mode=mode, bit_depth=depth)

    def _save_options(self) -> dict[str, object]:
        return {}

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        array = np.ascontiguousarray(pixels, dtype=np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=self.pil_format, **self._save_options())
        return buffer.getvalue()


class PngCodec(PillowCodec):
    media_type = "image/png"
    format_name = "png"
    aliases = ("image/x-png",)
    pil_format = "PNG"

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"\x89PNG\r\n\x1a\n")

    def _bit_depth(self, data: bytes, image: Image.Image) -> int:
        # IHDR bit depth sits at byte 24; Pillow reduces 16-bit colour PNGs to 8-bit modes.
        return data[24] if len(data) > 24 else super()._bit_depth(data, image)

    def _save_options(self) -> dict[str, object]:
        return {"compress_level": 1}

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        """8-bit gray or RGB PNG through OpenCV's libpng: fast zlib settings, same pixels as Pillow.

        The "up" row filter with run-length zlib at level 1 writes a 512² fundus image several times
        faster than Pillow's adaptive filtering, at about the same size. Other layouts use Pillow.
        """
        array = np.ascontiguousarray(pixels, dtype=np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 3 and array.shape[2] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
        elif array.ndim != 2:
            return super().encode(array, original=original, context=context)
        ok, encoded = cv2.imencode(".png", array, _PNG_PARAMS)
        if not ok:
            return super().encode(pixels, original=original, context=context)
        return encoded.tobytes()


class JpegCodec(PillowCodec):
    media_type = "image/jpeg"
    format_name = "jpeg"
    aliases = ("image/jpg", "image/pjpeg")
    pil_format = "JPEG"

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"\xff\xd8\xff")

    def _save_options(self) -> dict[str, object]:
        return {"quality": 95}


class TiffCodec(PillowCodec):
    media_type = "image/tiff"
    format_name = "tiff"
    aliases = ("image/tif", "image/x-tiff")
    pil_format = "TIFF"

    def sniff(self, head: bytes) -> bool:
        return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

    def _bit_depth(self, data: bytes, image: Image.Image) -> int:
        bits = getattr(image, "tag_v2", {}).get(258)
        if isinstance(bits, tuple | list) and bits:
            return int(bits[0])
        if isinstance(bits, int):
            return bits
        return super()._bit_depth(data, image)

    def _save_options(self) -> dict[str, object]:
        return {"compression": "tiff_deflate"}
