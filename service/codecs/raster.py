"""PNG, JPEG and TIFF through Pillow: any stored mode in, 8-bit RGB for the model; answers back in the
input's layout (gray or RGB) and, for PNG and TIFF, its depth (8 or 16 bits).

Conversions on decode: 16-bit samples are rescaled to 8 bits for the model (not truncated) and also
kept at full depth (``DecodedImage.samples16``), gray is replicated to
three channels, alpha is composited on black (the fundus background), CMYK and palette images go
through Pillow's converters, and the EXIF orientation tag is applied so pixels are upright. 8-bit RGB
PNG answers (what ``/enhance`` returns) are written by fpng, other PNG layouts through OpenCV's libpng
with fast compression settings (the encode sits on every request's path); the pixels are the same as
Pillow would write.
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import fpng
import numpy as np
import tifffile
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


#: PNG chunks that leave the stored samples as they are: no palette, transparency, orientation
#: (``eXIf``) or text (which may carry EXIF too). 8-bit gray or RGB PNGs with nothing else decode
#: through OpenCV's libpng (about a fifth faster than Pillow; same pixels, the format is lossless).
#: ``fdEC`` is fpng's marker chunk (our own answers sent back, e.g. a ``/degrade`` result).
_PLAIN_PNG_CHUNKS = frozenset(
    {b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tIME", b"sBIT", b"bKGD"}
    | {b"fdEC"}
)
_PNG_CHUNK = struct.Struct(">I4s")
_PNG_IHDR = struct.Struct(">IIBB")


def plain_png(data: bytes) -> tuple[int, int, bool] | None:
    """``(width, height, colour)`` of a complete 8-bit gray or RGB PNG made only of
    :data:`_PLAIN_PNG_CHUNKS`, else None (anything else, a truncated file included, goes to Pillow)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour_type = _PNG_IHDR.unpack_from(data, 16)
    if depth != 8 or colour_type not in (0, 2) or width == 0 or height == 0:
        return None
    offset = 8
    while offset + _PNG_CHUNK.size <= len(data):
        length, chunk = _PNG_CHUNK.unpack_from(data, offset)
        if chunk not in _PLAIN_PNG_CHUNKS:
            return None
        offset += 12 + length  # length, type, data, CRC
        if chunk == b"IEND":
            return (width, height, colour_type == 2) if offset <= len(data) else None
    return None


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


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 samples for 8-bit-only formats (JPEG): 16-bit answers are rounded down to 8 bits."""
    array = np.asarray(pixels)
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.ascontiguousarray(array, dtype=np.uint8)


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
        samples16 = self._samples16(data, pixels.shape[:2]) if depth > 8 else None
        return DecodedImage(
            pixels=pixels, media_type=self.media_type, mode=mode, bit_depth=depth, samples16=samples16
        )

    def _read_wide(self, data: bytes) -> np.ndarray | None:
        """The stored samples at full depth (any layout), or None when the format has no wide path."""
        return None

    def _samples16(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
        """uint16 [H, W] or [H, W, 3] RGB samples of a 16-bit upload, alpha composited on black."""
        try:
            wide = self._read_wide(data)
        except (*_DECODE_ERRORS, KeyError, TypeError, RuntimeError) as exc:
            raise UndecodableImage(f"{self.format_name.upper()} 16-bit data is truncated or corrupt") from exc
        if wide is None or wide.dtype != np.uint16:
            return None
        if wide.ndim == 3 and wide.shape[2] in (2, 4):  # gray or colour with alpha
            alpha = wide[:, :, -1:].astype(np.uint32)
            wide = ((wide[:, :, :-1].astype(np.uint32) * alpha + 32767) // 65535).astype(np.uint16)
        if wide.ndim == 3 and wide.shape[2] == 1:
            wide = wide[:, :, 0]
        if wide.shape[:2] != tuple(shape) or (wide.ndim == 3 and wide.shape[2] != 3):
            raise UndecodableImage(
                f"16-bit {self.format_name.upper()} with this layout or orientation is not supported; "
                "send it with 8 bits per sample"
            )
        return np.ascontiguousarray(wide)

    def _save_options(self) -> dict[str, object]:
        return {}

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        array = _eight_bit(pixels)
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

    def decode(self, data: bytes, *, max_pixels: int) -> DecodedImage:
        """Plain 8-bit gray or RGB PNGs (:func:`plain_png`) through libpng, everything else through
        Pillow; both give the same pixels, mode and depth (errors and limits come from the Pillow path)."""
        plain = plain_png(data)
        if plain is not None:
            width, height, colour = plain
            if width * height <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
                flags = (cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_IGNORE_ORIENTATION
                stored = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
                if stored is not None and stored.shape[:2] == (height, width):
                    pixels = cv2.cvtColor(stored, cv2.COLOR_BGR2RGB if colour else cv2.COLOR_GRAY2RGB)
                    mode = "RGB" if colour else "L"
                    return DecodedImage(pixels=pixels, media_type=self.media_type, mode=mode, bit_depth=8)
        return super().decode(data, max_pixels=max_pixels)

    def _read_wide(self, data: bytes) -> np.ndarray | None:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is None:
            raise ValueError("libpng could not read the 16-bit samples")
        if decoded.ndim == 3:
            order = cv2.COLOR_BGRA2RGBA if decoded.shape[2] == 4 else cv2.COLOR_BGR2RGB
            decoded = cv2.cvtColor(decoded, order) if decoded.shape[2] in (3, 4) else decoded
        return decoded

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        """Gray or RGB PNG, 8 or 16 bits, the same pixels as Pillow would write.

        8-bit RGB goes through fpng (a single-pass PNG writer: a 512² fundus image in under a
        millisecond, six to eight times faster than libpng at its fastest settings, for a file 10–20 %
        larger). Gray and 16-bit images go through OpenCV's libpng, where the "up" row filter
        with run-length zlib at level 1 is several times faster than Pillow's adaptive filtering at
        about the same size. Other layouts use Pillow.
        """
        if np.asarray(pixels).dtype == np.uint16:
            array = np.ascontiguousarray(pixels)
            if array.ndim == 3:
                array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
            ok, encoded = cv2.imencode(".png", array, _PNG_PARAMS)
            if not ok:
                raise ValueError("libpng could not write the 16-bit image")
            return encoded.tobytes()
        array = np.ascontiguousarray(pixels, dtype=np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 3 and array.shape[2] == 3:
            written = fpng.from_ndarray(array)
            if written:  # fpng answers b"" where it cannot write (libpng below then says why)
                return written
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

    def _read_wide(self, data: bytes) -> np.ndarray | None:
        return np.asarray(tifffile.imread(io.BytesIO(data), key=0))

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        """8-bit through Pillow; 16-bit (gray or RGB) through tifffile, deflate-compressed."""
        array = np.asarray(pixels)
        if array.dtype != np.uint16:
            return super().encode(pixels, original=original, context=context)
        buffer = io.BytesIO()
        photometric = "rgb" if array.ndim == 3 else "minisblack"
        tifffile.imwrite(buffer, np.ascontiguousarray(array), photometric=photometric, compression="zlib")
        return buffer.getvalue()
