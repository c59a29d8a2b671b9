"""Builds DICOM Part-10 photographs from real fundus images for the DICOM tests.

Every combination the reader must handle is made here with pydicom (and Pillow for JPEG baseline,
which pydicom cannot encode): Ophthalmic Photography and Secondary Capture, RGB / YBR_FULL /
YBR_FULL_422 / MONOCHROME2, uncompressed, JPEG baseline, JPEG-LS lossless and JPEG 2000 lossless.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    OphthalmicPhotography8BitImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Müller^Anna"
PATIENT_ID = "FE-PAT-0042"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"

SOP_CLASSES = {"op": OphthalmicPhotography8BitImageStorage, "sc": SecondaryCaptureImageStorage}


@dataclass(frozen=True)
class Variant:
    """One test file: SOP class family, photometric interpretation and compression."""

    sop: str  # "op" or "sc"
    photometric: str  # RGB, YBR_FULL, YBR_FULL_422, MONOCHROME2
    compression: str  # raw, jpeg, jpegls, j2k

    @property
    def id(self) -> str:
        return f"{self.sop}-{self.photometric.lower()}-{self.compression}"

    @property
    def lossless(self) -> bool:
        return self.compression in ("raw", "jpegls", "j2k")


VARIANTS = [
    Variant("op", "RGB", "raw"),
    Variant("sc", "RGB", "raw"),
    Variant("op", "YBR_FULL", "raw"),
    Variant("op", "YBR_FULL_422", "raw"),
    Variant("op", "MONOCHROME2", "raw"),
    Variant("sc", "MONOCHROME2", "raw"),
    Variant("op", "RGB", "jpeg"),
    Variant("op", "YBR_FULL", "jpeg"),
    Variant("op", "YBR_FULL_422", "jpeg"),
    Variant("sc", "YBR_FULL_422", "jpeg"),
    Variant("op", "MONOCHROME2", "jpeg"),
    Variant("op", "RGB", "jpegls"),
    Variant("sc", "MONOCHROME2", "jpegls"),
    Variant("op", "RGB", "j2k"),
    Variant("sc", "MONOCHROME2", "j2k"),
]


def load_fundus_rgb(path: Path, size: tuple[int, int] = (128, 96)) -> np.ndarray:
    """A real fundus photograph, resized to ``size`` (width, height): uint8 [H, W, 3]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)).copy()


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W] gray of an RGB image (ITU-R BT.601 weights)."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)


def reference_pixels(rgb: np.ndarray, variant: Variant) -> np.ndarray:
    """What the reader should return for ``variant`` made from ``rgb``: uint8 [H, W, 3]."""
    if variant.photometric == "MONOCHROME2":
        return np.repeat(luma(rgb)[:, :, None], 3, axis=2)
    return rgb


def base_dataset(sop_class: UID, *, patient_name: str = PATIENT_NAME) -> Dataset:
    """Patient, study, series and SOP attributes of a plausible fundus photograph (no pixels yet)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19580214"
    ds.PatientSex = "F"
    ds.PatientAge = "067Y"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20260301"
    ds.StudyTime = "101500"
    ds.StudyID = "S42"
    ds.AccessionNumber = "ACC-77"
    ds.ReferringPhysicianName = "Doctor^Referring"
    ds.StudyDescription = "Fundus photography"
    ds.SeriesInstanceUID = SERIES_UID
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.Manufacturer = "Test camera maker"
    ds.ContentDate = "20260301"
    ds.ContentTime = "101600"
    ds.PatientOrientation = ""
    if sop_class == OphthalmicPhotography8BitImageStorage:
        ds.Modality = "OP"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = "R"
        ds.Laterality = "R"
        ds.AcquisitionDateTime = "20260301101600"
        ds.BurnedInAnnotation = "NO"
        eye = Dataset()
        eye.CodeValue = "81745001"
        eye.CodingSchemeDesignator = "SCT"
        eye.CodeMeaning = "Eye"
        ds.AnatomicRegionSequence = Sequence([eye])
        ds.AcquisitionContextSequence = Sequence()
        ds.PatientEyeMovementCommanded = "NO"
        ds.NumberOfFrames = 1
    else:
        ds.Modality = "OT"
        ds.ConversionType = "DI"
        ds.ImageType = ["ORIGINAL", "SECONDARY"]
    return ds


def _set_pixel_module(ds: Dataset, rows: int, columns: int, photometric: str) -> None:
    colour = photometric != "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if colour:
        ds.PlanarConfiguration = 0


def _ybr_422_bytes(rgb: np.ndarray) -> bytes:
    """Native YBR_FULL_422 layout: Y1 Y2 Cb Cr for each horizontal pixel pair (even width)."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    height, width = ybr.shape[:2]
    pairs = ybr.reshape(height, width // 2, 2, 3)
    out = np.empty((height, width // 2, 4), dtype=np.uint8)
    out[..., 0] = np.rint(pairs[:, :, 0, 0])
    out[..., 1] = np.rint(pairs[:, :, 1, 0])
    out[..., 2] = np.rint(pairs[:, :, :, 1].mean(axis=2))
    out[..., 3] = np.rint(pairs[:, :, :, 2].mean(axis=2))
    return out.tobytes()


def _pillow_jpeg(rgb: np.ndarray, photometric: str) -> bytes:
    buffer = io.BytesIO()
    if photometric == "MONOCHROME2":
        Image.fromarray(luma(rgb), mode="L").save(buffer, "JPEG", quality=92)
    elif photometric == "RGB":
        Image.fromarray(rgb, mode="RGB").save(buffer, "JPEG", quality=92, keep_rgb=True, subsampling=0)
    else:
        subsampling = 1 if photometric == "YBR_FULL_422" else 0
        Image.fromarray(rgb, mode="RGB").save(buffer, "JPEG", quality=92, subsampling=subsampling)
    return buffer.getvalue()


def make_dicom(rgb: np.ndarray, variant: Variant, *, patient_name: str = PATIENT_NAME) -> bytes:
    """A Part-10 file of ``rgb`` (uint8 [H, W, 3], even width) encoded as ``variant`` describes."""
    ds = base_dataset(SOP_CLASSES[variant.sop], patient_name=patient_name)
    rows, columns = rgb.shape[:2]
    _set_pixel_module(ds, rows, columns, variant.photometric)
    transfer_syntax = ExplicitVRLittleEndian
    if variant.compression == "raw":
        if variant.photometric == "MONOCHROME2":
            ds.PixelData = luma(rgb).tobytes()
        elif variant.photometric == "RGB":
            ds.PixelData = rgb.tobytes()
        elif variant.photometric == "YBR_FULL":
            ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
        else:
            ds.PixelData = _ybr_422_bytes(rgb)
    elif variant.compression == "jpeg":
        ds.PixelData = encapsulate([_pillow_jpeg(rgb, variant.photometric)])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = "10"
        transfer_syntax = JPEGBaseline8Bit
    else:
        array = luma(rgb) if variant.photometric == "MONOCHROME2" else rgb
        transfer_syntax = JPEGLSLossless if variant.compression == "jpegls" else JPEG2000Lossless
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, array, generate_instance_uid=False)
    return to_part10(ds, transfer_syntax)


def to_part10(ds: Dataset, transfer_syntax: UID) -> bytes:
    """Serialise ``ds`` with a file meta header for ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
