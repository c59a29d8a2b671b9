"""Hostile uploads that are small on the wire and huge once decoded (decompression bombs)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.dicom.builders import Variant, make_dicom


def _dataset_bytes(part10: bytes) -> tuple[pydicom.Dataset, bytes]:
    """The dataset (explicit VR little endian) of a Part-10 file and its raw bytes after the meta."""
    (length,) = struct.unpack("<I", part10[140:144])
    return pydicom.dcmread(io.BytesIO(part10)), part10[144 + length :]


def deflate_bomb(rgb: np.ndarray, inflated: int = 1 << 30) -> bytes:
    """A valid deflated DICOM whose dataset ends with a private OB element of ``inflated`` zero bytes.

    Compressed, the zeros take about a thousandth of their size, so the upload stays small; the
    element is streamed into the compressor, never held whole.
    """
    dataset, body = _dataset_bytes(make_dicom(rgb, Variant("op", "RGB", "raw")))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(pydicom.filebase.DicomFileLike(buffer), meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [buffer.getvalue(), compressor.compress(body)]
    creator = b"BOMB"
    # (7FE1,0010) LO private creator, then (7FE1,1010) OB with a 4-byte length (explicit VR).
    out.append(compressor.compress(struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", len(creator)) + creator))
    out.append(compressor.compress(struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, inflated)))
    chunk = bytes(1 << 20)
    for _ in range(inflated // len(chunk)):
        out.append(compressor.compress(chunk))
    out.append(compressor.flush())
    return b"".join(out)


def jpeg_frame_bomb(rgb: np.ndarray, rows: int = 12_000, columns: int = 12_000) -> bytes:
    """A JPEG-baseline DICOM that declares the photograph's size but whose frame header (SOF0) says
    ``rows`` × ``columns``: a decoder allocates that before it notices the data is missing."""
    original = make_dicom(rgb, Variant("op", "RGB", "jpeg"))
    dataset = pydicom.dcmread(io.BytesIO(original))
    frame = bytearray(list(generate_fragments(dataset.PixelData))[1])  # after the offset table
    sof = frame.find(b"\xff\xc0")
    assert sof > 0
    frame[sof + 5 : sof + 9] = struct.pack(">HH", rows, columns)
    dataset.PixelData = encapsulate([bytes(frame)])
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
