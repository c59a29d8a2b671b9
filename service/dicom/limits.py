"""Bounds on what a DICOM upload may expand to, checked before anything big is allocated.

* Deflated transfer syntax: the dataset is inflated in bounded chunks first; one that would grow
  past the limit (a megabyte of zeros can hold a gigabyte element) is refused without inflating it.
* Compressed pixel data: the first frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) is
  read and compared with Rows/Columns, so a small header over a huge frame is refused before the
  decoder allocates the frame.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.dicom.errors import DicomTooLarge, DicomUndecodable

#: Inflate this much at a time.
CHUNK = 1 << 20
#: DICOM meta and attributes beside the pixels may take this much on top of the pixels.
METADATA_ALLOWANCE = 16 << 20

# JPEG start-of-frame markers (baseline, extended, progressive, lossless, and JPEG-LS SOF55).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


def inflated_limit(max_pixels: int) -> int:
    """Largest inflated dataset accepted: 16-bit RGB pixels at ``max_pixels`` plus the attributes."""
    return max_pixels * 3 * 2 + METADATA_ALLOWANCE


def check_deflated(data: bytes, offset: int, limit: int) -> None:
    """Inflate ``data[offset:]`` (raw deflate) in bounded chunks; DicomTooLarge past ``limit`` bytes.

    The output is counted and discarded, so at most ``CHUNK`` bytes exist at a time.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    position = offset
    try:
        while position < len(data) and not inflater.eof:
            pending = data[position : position + CHUNK]
            position += len(pending)
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, CHUNK))
                if total > limit:
                    raise DicomTooLarge(
                        "image_too_large", "the deflated DICOM dataset expands beyond the allowed size"
                    )
                pending = inflater.unconsumed_tail
    except zlib.error:
        raise DicomUndecodable("dicom_invalid", "the deflated DICOM dataset is corrupt") from None


def meta_end(data: bytes) -> int:
    """Offset of the dataset after a Part-10 file meta group (from its group length element)."""
    if len(data) < 144 or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        raise DicomUndecodable("dicom_invalid", "the DICOM file meta has no group length")
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + length


def meta_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID of a Part-10 file meta group (explicit VR little endian), or None."""
    position, end = 132, min(len(data), meta_end(data))
    while position + 8 <= end:
        group, element, vr = struct.unpack("<HH2s", data[position : position + 6])
        if group != 0x0002:
            return None
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack("<I", data[position + 8 : position + 12])
            value_at = position + 12
        else:
            (length,) = struct.unpack("<H", data[position + 6 : position + 8])
            value_at = position + 8
        if element == 0x0010:
            return data[value_at : value_at + length].rstrip(b"\0 ").decode("ascii", "replace")
        position = value_at + length
    return None


def is_deflated(transfer_syntax: str) -> bool:
    return UID(transfer_syntax) == DeflatedExplicitVRLittleEndian


def frame_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a compressed frame's own header, or None when it has none we know."""
    if fragment[:2] == b"\xff\xd8":
        return _jpeg_size(fragment)
    start = fragment.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream: SOC then SIZ
    if start >= 0 and len(fragment) >= start + 22:
        # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", fragment[start + 8 : start + 24])
        return ysiz - yo, xsiz - xo
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _SOF and position + 9 <= len(data):
            rows, columns = struct.unpack(">HH", data[position + 5 : position + 9])
            return rows, columns
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def check_frame_size(dataset: Dataset, rows: int, columns: int) -> None:
    """Refuse encapsulated pixel data whose first frame header disagrees with Rows/Columns."""
    try:
        # The first item is the Basic Offset Table (often empty); the frame starts after it.
        fragments = generate_fragments(dataset.PixelData)
        next(fragments)
        fragment = next(fragments)
    except (StopIteration, ValueError, TypeError, AttributeError, struct.error):
        raise DicomUndecodable("dicom_undecodable", "the DICOM compressed pixel data is malformed") from None
    size = frame_size(bytes(fragment[:65536]))
    if size is not None and size != (rows, columns):
        raise DicomUndecodable(
            "dicom_undecodable", "the compressed DICOM frame does not match the image's Rows/Columns"
        )
