"""``application/dicom`` for the service's codec registry (found by ``service.codecs.default_registry``).

Decode: Part-10 upload → :class:`DecodedImage` (RGB pixels; the source header in ``source``).
Encode, by the request's task:
- ``enhance``: a derived Secondary Capture in a new series of the source's study;
- ``segment``: a DICOM Segmentation of the source (BINARY for a thresholded map, else FRACTIONAL);
- ``degrade``: a derived Secondary Capture in its own "synthetically degraded" series.
A DICOM answer needs a DICOM upload (the result joins the source's patient and study); otherwise the
encoder refuses with a :class:`CodecError` (the route's 400).

The output transfer syntax comes from ``EncodeContext.extra["transfer_syntax"]`` (``explicit``,
``jpeg`` or a UID, see :func:`transfer_syntax_from_accept`), explicit VR little endian by default.
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset

from service.codecs.base import Codec, CodecError, DecodedImage, EncodeContext, ImageTooLarge
from service.dicom.errors import DicomError, DicomTooLarge, DicomWriteError
from service.dicom.provenance import Provenance
from service.dicom.reader import read_dicom
from service.dicom.segmentation import write_vessel_segmentation
from service.dicom.writer import resolve_transfer_syntax, write_enhanced
from service.errors import ApiError

log = logging.getLogger("fundus.dicom")

MEDIA_TYPE = "application/dicom"
ENHANCER_NAME = "T-MAGE-Net"
VESSEL_NAME = "T-MAGE-Net vessel branch"
DEGRADER_NAME = "Cofe-Net degradation"


def transfer_syntax_from_accept(accept: str | None) -> str | None:
    """The ``transfer-syntax`` parameter of an ``application/dicom`` entry in an Accept header.

    ``Accept: application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50`` (the DICOMweb convention)
    → ``"1.2.840.10008.1.2.4.50"``; ``*`` or no parameter → None (the default).
    """
    if not accept:
        return None
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        if media.strip().lower() != MEDIA_TYPE:
            continue
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            value = value.strip().strip('"')
            if key.strip().lower() == "transfer-syntax" and value and value != "*":
                return value
    return None


class DicomCodec(Codec):
    """DICOM Part-10 photographs in; derived instances and segmentations out."""

    media_type = MEDIA_TYPE
    format_name = "dicom"
    aliases = ("application/dicom+file", "application/x-dicom")

    def sniff(self, head: bytes) -> bool:
        return len(head) >= 132 and head[128:132] == b"DICM"

    def decode(self, data: bytes, *, max_pixels: int) -> DecodedImage:
        try:
            photo = read_dicom(data, max_pixels=max_pixels)
        except DicomTooLarge as exc:
            raise ImageTooLarge(exc.message) from None
        except DicomError as exc:
            # Keep the specific code (dicom_multiframe, dicom_not_image, ...) and its 415/422 status.
            raise ApiError(exc.status_code, exc.code, exc.message) from None
        return DecodedImage(
            pixels=photo.pixels,
            media_type=MEDIA_TYPE,
            mode="L" if photo.monochrome else "RGB",
            bit_depth=photo.bits_stored,
            source=photo.dataset,
        )

    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        source = original.source if original is not None else None
        if not isinstance(source, Dataset):
            raise CodecError(
                "DICOM output needs a DICOM upload: the result is written into the source's patient and study"
            )
        try:
            if context.task == "segment":
                provenance = Provenance(VESSEL_NAME, context.model_version, context.description)
                return write_vessel_segmentation(source, pixels, provenance).data
            syntax = resolve_transfer_syntax(context.extra.get("transfer_syntax"))
            if context.task == "degrade":
                provenance = Provenance(DEGRADER_NAME, context.model_version, _degrade_description(context))
                return write_enhanced(
                    source, pixels, provenance, kind="degraded", transfer_syntax=syntax
                ).data
            provenance = Provenance(ENHANCER_NAME, context.model_version, context.description)
            return write_enhanced(source, pixels, provenance, transfer_syntax=syntax).data
        except DicomWriteError as exc:
            raise CodecError(str(exc)) from None
        except Exception as exc:
            # Anything else comes from the source header's content: say so without quoting it.
            log.warning("dicom write failed", extra={"task": context.task, "reason": type(exc).__name__})
            raise CodecError("the DICOM result cannot be written from this upload's header") from None


def _degrade_description(context: EncodeContext) -> str:
    extra = context.extra
    parts = [context.description or DEGRADER_NAME]
    for key in ("seed", "mode", "types"):
        if key in extra:
            value = extra[key]
            parts.append(f"{key} {','.join(map(str, value)) if isinstance(value, list) else value}")
    return "; ".join(parts)


def make_codec() -> Codec:
    """Entry point used by ``service.codecs.default_registry``."""
    return DicomCodec()
