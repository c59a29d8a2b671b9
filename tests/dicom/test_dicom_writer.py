"""Derived instances: provenance, identity, pixels, and validity per dciodvfy; vessel Segmentations."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from service.codecs.base import CodecError, DecodedImage, EncodeContext
from service.dicom.codec import DicomCodec, transfer_syntax_from_accept
from service.dicom.provenance import Provenance
from service.dicom.reader import read_dicom
from service.dicom.segmentation import write_vessel_segmentation
from service.dicom.writer import resolve_transfer_syntax, write_enhanced
from tests.dicom.builders import (
    PATIENT_ID,
    PATIENT_NAME,
    STUDY_UID,
    Variant,
    base_dataset,
    make_dicom,
    to_part10,
)
from tests.dicom.conftest import dciodvfy_errors

PROVENANCE = Provenance("T-MAGE-Net", "tiny-0123456789ab", "T-MAGE-Net enhancement")
SOURCES = [
    Variant("op", "RGB", "raw"),
    Variant("op", "YBR_FULL_422", "jpeg"),
    Variant("sc", "MONOCHROME2", "raw"),
    Variant("op", "RGB", "j2k"),
]


def _parse(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize("syntax", ["explicit", "jpeg"])
@pytest.mark.parametrize("variant", SOURCES, ids=[v.id for v in SOURCES])
def test_write_enhanced_is_valid_derived_instance(
    fundus_rgb: np.ndarray, variant: Variant, syntax: str, tmp_path: Path
) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, variant))
    enhanced = np.ascontiguousarray(255 - photo.pixels)  # any distinct picture
    derived = write_enhanced(photo.dataset, enhanced, PROVENANCE, transfer_syntax=syntax)  # type: ignore[arg-type]

    assert dciodvfy_errors(derived.data, tmp_path) == []
    ds = _parse(derived.data)
    source = photo.dataset
    assert ds.file_meta.TransferSyntaxUID == (
        ExplicitVRLittleEndian if syntax == "explicit" else JPEGBaseline8Bit
    )
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.SOPInstanceUID == derived.sop_instance_uid != source.SOPInstanceUID
    assert ds.SeriesInstanceUID == derived.series_instance_uid != source.SeriesInstanceUID
    assert ds.StudyInstanceUID == STUDY_UID
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
    ):
        assert ds[keyword].value == source[keyword].value
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert "Enhanced" in ds.SeriesDescription
    assert "tiny-0123456789ab" in ds.DerivationDescription
    assert ds.DerivationCodeSequence[0].CodeValue == "110001"
    reference = ds.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.ManufacturerModelName == "T-MAGE-Net"
    assert "tiny-0123456789ab" in list(equipment.SoftwareVersions)
    assert ds.Modality == source.Modality

    lossy_source = variant.compression == "jpeg"
    assert ds.LossyImageCompression == ("01" if lossy_source or syntax == "jpeg" else "00")
    if lossy_source and syntax == "jpeg":
        assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]

    pixels = ds.pixel_array
    if variant.photometric == "MONOCHROME2":
        assert ds.PhotometricInterpretation == "MONOCHROME2" and pixels.ndim == 2
        expected = enhanced[:, :, 0]
    else:
        assert ds.PhotometricInterpretation == ("RGB" if syntax == "explicit" else "YBR_FULL_422")
        expected = enhanced
    diff = np.abs(pixels.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() == 0 if syntax == "explicit" else diff.mean() < 4.0


def test_dciodvfy_reports_errors_in_a_broken_instance(fundus_rgb: np.ndarray, tmp_path: Path) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    ds = _parse(write_enhanced(photo.dataset, photo.pixels, PROVENANCE).data)
    del ds.ConversionType
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert any("ConversionType" in line for line in dciodvfy_errors(buffer.getvalue(), tmp_path))


def test_write_enhanced_series_is_shared_per_source_series_and_weights(fundus_rgb: np.ndarray) -> None:
    first = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    second = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    a = write_enhanced(first.dataset, first.pixels, PROVENANCE)
    b = write_enhanced(second.dataset, second.pixels, PROVENANCE)
    c = write_enhanced(first.dataset, first.pixels, Provenance("T-MAGE-Net", "lite-fedcba987654"))
    assert a.series_instance_uid == b.series_instance_uid != c.series_instance_uid
    assert a.sop_instance_uid != b.sop_instance_uid


def test_write_enhanced_model_size_output_records_resampling(fundus_rgb: np.ndarray, tmp_path: Path) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    square = np.zeros((80, 80, 3), dtype=np.uint8)
    derived = write_enhanced(photo.dataset, square, PROVENANCE)
    ds = _parse(derived.data)
    assert (ds.Rows, ds.Columns) == (80, 80)
    assert [item.CodeValue for item in ds.DerivationCodeSequence] == ["110001", "113085"]
    assert dciodvfy_errors(derived.data, tmp_path) == []


@pytest.mark.parametrize("sop", ["op", "sc"])
@pytest.mark.parametrize("kind", ["probability", "mask"])
def test_write_vessel_segmentation_is_valid_and_references_source(
    fundus_rgb: np.ndarray, sop: str, kind: str, tmp_path: Path
) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant(sop, "RGB", "raw")))
    probability = fundus_rgb[:, :, 1].copy()
    vessel_map = probability if kind == "probability" else np.where(probability > 60, 255, 0).astype(np.uint8)
    derived = write_vessel_segmentation(photo.dataset, vessel_map, PROVENANCE)

    assert dciodvfy_errors(derived.data, tmp_path) == []
    ds = _parse(derived.data)
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.SegmentationType == ("FRACTIONAL" if kind == "probability" else "BINARY")
    assert ds.StudyInstanceUID == STUDY_UID and str(ds.PatientName) == PATIENT_NAME
    assert ds.SeriesInstanceUID != photo.dataset.SeriesInstanceUID
    assert ds.SegmentSequence[0].SegmentLabel == "Retinal vessels"
    source_ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == photo.dataset.SOPInstanceUID
    assert source_ref.ReferencedSOPClassUID == photo.dataset.SOPClassUID
    assert ds.ContributingEquipmentSequence[0].ManufacturerModelName == "T-MAGE-Net"
    expected = vessel_map if kind == "probability" else vessel_map // 255
    assert np.array_equal(ds.pixel_array, expected)


def test_write_vessel_segmentation_refuses_other_geometry(fundus_rgb: np.ndarray) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    with pytest.raises(ValueError, match="source"):
        write_vessel_segmentation(photo.dataset, np.zeros((64, 64), dtype=np.uint8), PROVENANCE)


def test_transfer_syntax_names_and_accept_parameter() -> None:
    assert resolve_transfer_syntax(None) == "explicit"
    assert resolve_transfer_syntax("1.2.840.10008.1.2.4.50") == "jpeg"
    assert resolve_transfer_syntax("JPEG") == "jpeg"
    with pytest.raises(ValueError):
        resolve_transfer_syntax("1.2.840.10008.1.2.5")
    accept = 'image/png;q=0.5, application/dicom; transfer-syntax="1.2.840.10008.1.2.4.50"'
    assert transfer_syntax_from_accept(accept) == "1.2.840.10008.1.2.4.50"
    assert transfer_syntax_from_accept("application/dicom; transfer-syntax=*") is None
    assert transfer_syntax_from_accept("application/dicom") is None


def test_codec_round_trip_by_task(fundus_rgb: np.ndarray) -> None:
    codec = DicomCodec()
    data = make_dicom(fundus_rgb, Variant("op", "YBR_FULL_422", "jpeg"))
    assert codec.sniff(data[:512]) and not codec.sniff(b"\x89PNG" + bytes(200))
    decoded = codec.decode(data, max_pixels=10**6)
    assert decoded.pixels.shape == fundus_rgb.shape and decoded.media_type == "application/dicom"

    def encode(task: str, pixels: np.ndarray, **extra: object) -> pydicom.Dataset:
        context = EncodeContext(task=task, model_version="tiny-0123456789ab", extra=dict(extra))
        return _parse(codec.encode(pixels, original=decoded, context=context))

    enhanced = encode("enhance", decoded.pixels, transfer_syntax="1.2.840.10008.1.2.4.50")
    assert enhanced.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert "Enhanced" in enhanced.SeriesDescription
    degraded = encode("degrade", decoded.pixels, seed=7, mode="cofe", types=["blur"])
    assert (
        "seed 7" in degraded.DerivationDescription
        and degraded.SeriesInstanceUID != enhanced.SeriesInstanceUID
    )
    vessels = encode("segment", decoded.pixels[:, :, 0])
    assert vessels.SOPClassUID == SegmentationStorage

    png_upload = DecodedImage(pixels=fundus_rgb, media_type="image/png", mode="RGB", bit_depth=8)
    with pytest.raises(CodecError, match="DICOM upload"):
        codec.encode(
            fundus_rgb, original=png_upload, context=EncodeContext(task="enhance", model_version="v")
        )
    with pytest.raises(CodecError):
        encode("enhance", decoded.pixels, transfer_syntax="1.2.840.10008.1.2.5")


def _malformed_source(rgb: np.ndarray) -> bytes:
    """A photograph whose patient and study values break their VRs (too long, not a date)."""
    ds = base_dataset(SecondaryCaptureImageStorage, patient_name="Zzyzxsecret^" * 8)
    ds.PatientBirthDate = "Zzyzxsecret"
    ds.StudyDate = "notadate"
    ds.SeriesNumber = None
    ds.InstanceNumber = None
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return to_part10(ds, ExplicitVRLittleEndian)


def test_writers_copy_malformed_patient_values_verbatim(fundus_rgb: np.ndarray) -> None:
    codec = DicomCodec()
    decoded = codec.decode(_malformed_source(fundus_rgb), max_pixels=10**6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task, pixels in (("enhance", decoded.pixels), ("segment", decoded.pixels[:, :, 0])):
            context = EncodeContext(task=task, model_version="tiny-0123456789ab")
            ds = _parse(codec.encode(pixels, original=decoded, context=context))
            assert ds["PatientBirthDate"].value == "Zzyzxsecret"
            assert str(ds.PatientName).startswith("Zzyzxsecret^")
    assert all("Zzyzxsecret" not in str(w.message) for w in caught)


def test_codec_write_errors_do_not_quote_the_header(fundus_rgb: np.ndarray) -> None:
    codec = DicomCodec()
    decoded = codec.decode(_malformed_source(fundus_rgb), max_pixels=10**6)
    decoded.source.Rows = "Zzyzxsecret"  # breaks the Segmentation writer inside highdicom
    context = EncodeContext(task="segment", model_version="v")
    with pytest.raises(CodecError) as excinfo:
        codec.encode(decoded.pixels[:, :, 0], original=decoded, context=context)
    assert "Zzyzxsecret" not in str(excinfo.value)
