"""DICOM Part-10 bytes → one RGB photograph [H, W, 3] uint8 plus the source header.

Accepted: single-frame photographs of the Ophthalmic Photography, VL Photographic and Secondary
Capture families, with photometric interpretation RGB, YBR_FULL, YBR_FULL_422, YBR_ICT/YBR_RCT
(JPEG 2000), MONOCHROME1/2 or PALETTE COLOR, uncompressed (implicit/explicit/deflated/big endian) or
compressed (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) through pydicom's decoders
(pylibjpeg, pyjpegls, Pillow).

Multi-frame instances are refused with 422 (``dicom_multiframe``) rather than enhanced frame by frame:
the service's contract is one photograph in, one photograph out, and one request holds one slot of
the model queue, so a 40-frame stereo or sequence instance would bypass admission control and the
deadline budget. A client splits frames (or sends the instances of its series one by one) and gets one
derived instance per photograph.

Errors (:mod:`service.dicom.errors`) never quote values from the file.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from service.dicom.errors import DicomTooLarge, DicomUndecodable, DicomUnusable
from service.dicom.limits import (
    check_deflated,
    check_frame_size,
    inflated_limit,
    is_deflated,
    meta_end,
    meta_transfer_syntax,
)

log = logging.getLogger("fundus.dicom")

# pydicom's value validation on read warns with the offending value quoted (a malformed PatientName
# would end up in the log); the service only reads untrusted files, so it validates nothing on read.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

PHOTOGRAPH_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "Wide Field Ophthalmic Photography Stereographic Projection Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "Wide Field Ophthalmic Photography 3D Coordinates Image",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}
"""SOP classes read as fundus photographs (UID → name); anything else is refused with 422."""

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


@dataclass(frozen=True)
class DicomPhoto:
    """One decoded DICOM photograph.

    Attributes:
        pixels: uint8 [H, W, 3] RGB; monochrome sources are replicated to three channels.
        dataset: the source header (pixel data dropped), for writing derived instances.
    """

    pixels: np.ndarray
    dataset: Dataset

    @property
    def photometric_interpretation(self) -> str:
        return str(self.dataset.get("PhotometricInterpretation", ""))

    @property
    def monochrome(self) -> bool:
        return self.photometric_interpretation in _MONOCHROME

    @property
    def bits_stored(self) -> int:
        return int(self.dataset.get("BitsStored", 8) or 8)


def read_dicom(data: bytes, *, max_pixels: int = 64_000_000) -> DicomPhoto:
    """Parse and decode a Part-10 file.

    Args:
        data: the file's bytes (128-byte preamble, ``DICM``, file meta, dataset).
        max_pixels: largest Rows × Columns accepted; checked from the header before decoding.

    Raises:
        DicomUndecodable: not Part-10, unreadable header, unsupported transfer syntax or photometric
            interpretation, or broken pixel data (415).
        DicomUnusable: not an image object (SR, no pixel data), not a photograph SOP class, or
            multi-frame (422).
        DicomTooLarge: Rows × Columns above ``max_pixels`` (413).
    """
    _check_inflated_size(data, max_pixels)
    dataset = _parse(data)
    _check_is_photograph(dataset)
    transfer_syntax = _check_transfer_syntax(dataset)
    rows, columns = _check_geometry(dataset, max_pixels)
    photometric = _check_pixel_description(dataset)
    if transfer_syntax.is_compressed:
        check_frame_size(dataset, rows, columns)
    try:
        raw = dataset.pixel_array
    except Exception as exc:
        log.info("dicom pixel decode failed", extra={"reason": type(exc).__name__})
        raise DicomUndecodable("dicom_undecodable", "the DICOM pixel data could not be decoded") from None
    if raw.shape[:2] != (rows, columns):
        raise DicomUndecodable(
            "dicom_undecodable", "the decoded DICOM pixel data does not match Rows/Columns"
        )
    pixels = _to_rgb8(raw, dataset, photometric)
    del dataset.PixelData
    return DicomPhoto(pixels=pixels, dataset=dataset)


def _check_inflated_size(data: bytes, max_pixels: int) -> None:
    """A deflated dataset must not expand past what ``max_pixels`` allows (checked without keeping it)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return  # _parse refuses it with the right message
    try:
        syntax = meta_transfer_syntax(data)
    except (DicomUndecodable, struct.error, ValueError):  # a broken meta group is _parse's to report
        return
    if syntax and is_deflated(syntax):
        check_deflated(data, meta_end(data), inflated_limit(max_pixels))


def _parse(data: bytes) -> Dataset:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomUndecodable("dicom_invalid", "the upload is not a DICOM Part-10 file (no DICM preamble)")
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=False)
        truncated = _last_value_truncated(dataset)
        # Values are converted lazily; convert everything now so that a malformed element fails here
        # (as a 415) and not later while a derived instance is written.
        dataset.walk(lambda _ds, _elem: None)
        transfer_syntax = dataset.file_meta.TransferSyntaxUID
    except Exception as exc:  # pydicom raises many types for malformed input; all mean the same here
        log.info("dicom parse failed", extra={"reason": type(exc).__name__})
        raise DicomUndecodable("dicom_invalid", "the upload is not a readable DICOM Part-10 file") from None
    if truncated:
        raise DicomUndecodable("dicom_truncated", "the DICOM file ends in the middle of an attribute")
    if not transfer_syntax:
        raise DicomUndecodable("dicom_invalid", "the DICOM file meta has no transfer syntax")
    return dataset


def _last_value_truncated(dataset: Dataset) -> bool:
    """True when the file stopped inside its last element (pydicom keeps the short value silently)."""
    if not len(dataset):
        return False
    raw = dataset.get_item(max(dataset.keys()))
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH or raw.value is None:
        return False
    return len(raw.value) < raw.length


def _check_is_photograph(dataset: Dataset) -> None:
    if not any(tag in dataset for tag in _PIXEL_TAGS):
        raise DicomUnusable(
            "dicom_not_image",
            "the DICOM object has no pixel data (e.g. a structured report), nothing to enhance",
        )
    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class not in PHOTOGRAPH_SOP_CLASSES:
        # Never echo values from the file (a private or made-up UID can carry anything).
        raise DicomUnusable(
            "dicom_not_photograph",
            "the DICOM SOP class is not a photograph; send Ophthalmic Photography, VL Photographic "
            "or Secondary Capture images",
        )
    if 0x7FE00010 not in dataset:
        raise DicomUnusable(
            "dicom_not_image", "the DICOM object holds floating-point pixel data, not a photograph"
        )
    frames = dataset.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise DicomUndecodable("dicom_invalid", "the DICOM Number of Frames is not a number") from None
    if n_frames != 1:
        raise DicomUnusable(
            "dicom_multiframe", "multi-frame instances are not accepted; send one frame per request"
        )


def _check_transfer_syntax(dataset: Dataset) -> UID:
    transfer_syntax = UID(str(dataset.file_meta.TransferSyntaxUID))
    if transfer_syntax.is_compressed:
        try:
            available = get_decoder(transfer_syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DicomUndecodable(
                "dicom_unsupported_transfer_syntax",
                "the DICOM transfer syntax is not supported; send uncompressed, JPEG baseline, JPEG-LS "
                "or JPEG 2000",
            )
    return transfer_syntax


def _check_geometry(dataset: Dataset, max_pixels: int) -> tuple[int, int]:
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomUndecodable("dicom_invalid", "the DICOM image has no valid Rows/Columns") from None
    if rows < 1 or columns < 1:
        raise DicomUndecodable("dicom_invalid", "the DICOM image has no valid Rows/Columns")
    if rows * columns > max_pixels:
        raise DicomTooLarge(
            "image_too_large", f"the DICOM image has more than the {max_pixels} pixels allowed"
        )
    return rows, columns


def _check_pixel_description(dataset: Dataset) -> str:
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    bits_allocated = int(dataset.get("BitsAllocated", 0) or 0)
    expected_samples = 3 if photometric in _COLOUR else 1
    if photometric not in _COLOUR | _MONOCHROME | {"PALETTE COLOR"} or samples != expected_samples:
        raise DicomUndecodable(
            "dicom_unsupported_photometric",
            "the DICOM photometric interpretation is not supported; send RGB, YBR, MONOCHROME or "
            "PALETTE COLOR images",
        )
    if bits_allocated not in (8, 16):
        raise DicomUndecodable(
            "dicom_unsupported_bit_depth", "only DICOM images with 8 or 16 bits allocated are supported"
        )
    return photometric


def _to_rgb8(raw: np.ndarray, dataset: Dataset, photometric: str) -> np.ndarray:
    """Decoded array ([H, W] or [H, W, 3], any integer dtype) → uint8 [H, W, 3] RGB."""
    if photometric == "PALETTE COLOR":
        try:
            raw = apply_color_lut(raw, dataset)
        except Exception:
            raise DicomUndecodable(
                "dicom_undecodable", "the DICOM palette colour lookup table is invalid"
            ) from None
        bits = 16 if raw.dtype.itemsize > 1 else 8
        signed = False
    else:
        bits = int(dataset.get("BitsStored", 8) or 8)
        signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    scaled = _scale_to_uint8(raw, bits, signed)
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[:, :, None], 3, axis=2)
    return np.ascontiguousarray(scaled)


def _scale_to_uint8(raw: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Map the stored value range (``bits`` wide) linearly onto 0..255."""
    if raw.dtype == np.uint8 and bits == 8 and not signed:
        return raw
    values = raw.astype(np.float64)
    if signed:
        values += 2 ** (bits - 1)
    top = float(2**bits - 1)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
