"""DICOM reader: every photometric interpretation and compression, and the refusals (415/422/413)."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from service.dicom.errors import DicomError, DicomTooLarge, DicomUndecodable, DicomUnusable
from service.dicom.reader import read_dicom
from tests.dicom.builders import VARIANTS, Variant, base_dataset, make_dicom, reference_pixels, to_part10

SECRET_NAME = "Zzyzxsecret^Patientname"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_read_dicom_decodes_every_variant_to_rgb(fundus_rgb: np.ndarray, variant: Variant) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, variant))
    expected = reference_pixels(fundus_rgb, variant)
    assert photo.pixels.dtype == np.uint8
    assert photo.pixels.shape == expected.shape
    diff = np.abs(photo.pixels.astype(np.int16) - expected.astype(np.int16))
    if variant.lossless and variant.photometric in ("RGB", "MONOCHROME2"):
        assert diff.max() == 0
    elif variant.lossless and variant.photometric == "YBR_FULL":
        assert diff.max() <= 1  # YCbCr round-off only
    else:
        assert diff.mean() < 3.0  # chroma subsampling and/or JPEG quantisation
    assert photo.monochrome == (variant.photometric == "MONOCHROME2")
    assert "PixelData" not in photo.dataset
    assert str(photo.dataset.PatientID) == "FE-PAT-0042"


def test_read_dicom_monochrome_is_replicated_gray(fundus_rgb: np.ndarray) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "MONOCHROME2", "raw")))
    assert np.array_equal(photo.pixels[:, :, 0], photo.pixels[:, :, 1])
    assert np.array_equal(photo.pixels[:, :, 1], photo.pixels[:, :, 2])


def test_read_dicom_rescales_16_bit_monochrome() -> None:
    ds = base_dataset(SecondaryCaptureImageStorage)
    values = np.array([[0, 1023], [512, 4095]], dtype=np.uint16).repeat(40, axis=0).repeat(40, axis=1)
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.tobytes()
    photo = read_dicom(to_part10(ds, ExplicitVRLittleEndian))
    assert photo.pixels[0, 0, 0] == 0
    assert photo.pixels[-1, -1, 0] == 255
    assert photo.pixels[0, -1, 0] == round(1023 * 255 / 4095)


def test_read_dicom_inverts_monochrome1(fundus_rgb: np.ndarray) -> None:
    ds = base_dataset(SecondaryCaptureImageStorage)
    gray = fundus_rgb[:, :, 1]
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = gray.tobytes()
    photo = read_dicom(to_part10(ds, ExplicitVRLittleEndian))
    assert np.array_equal(photo.pixels[:, :, 0], 255 - gray)


def _secret_photo(rgb: np.ndarray) -> bytes:
    return make_dicom(rgb, Variant("op", "RGB", "raw"), patient_name=SECRET_NAME)


def _structured_report() -> bytes:
    ds = base_dataset(BasicTextSRStorage, patient_name=SECRET_NAME)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    return to_part10(ds, ExplicitVRLittleEndian)


def _multiframe(rgb: np.ndarray) -> bytes:
    ds = base_dataset(SecondaryCaptureImageStorage, patient_name=SECRET_NAME)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.4"  # multi-frame true colour SC
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = 2
    ds.PixelData = rgb.tobytes() * 2
    return to_part10(ds, ExplicitVRLittleEndian)


def _ct_image(rgb: np.ndarray) -> bytes:
    ds = base_dataset(CTImageStorage, patient_name=SECRET_NAME)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb[:, :, 0].tobytes()
    return to_part10(ds, ExplicitVRLittleEndian)


def _unsupported_photometric(rgb: np.ndarray) -> bytes:
    ds = base_dataset(SecondaryCaptureImageStorage, patient_name=SECRET_NAME)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "HSV", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return to_part10(ds, ExplicitVRLittleEndian)


def _corrupt_jpeg(rgb: np.ndarray) -> bytes:
    """A well-formed DICOM file whose JPEG frame has its markers overwritten after SOI."""
    ds = base_dataset(SecondaryCaptureImageStorage, patient_name=SECRET_NAME)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90, subsampling=1)
    stream = buffer.getvalue()
    ds.PixelData = encapsulate([stream[:2] + bytes(len(stream) - 4) + stream[-2:]])
    ds["PixelData"].VR = "OB"
    return to_part10(ds, JPEGBaseline8Bit)


def _truncated_header(rgb: np.ndarray) -> bytes:
    data = _secret_photo(rgb)
    return data[: data.find(SECRET_NAME.split("^")[0].encode()) + 5]


def _truncated_pixels(rgb: np.ndarray) -> bytes:
    return _secret_photo(rgb)[:-5000]


BAD_CASES = {
    "not-dicom": (lambda rgb: b"\x89PNG\r\n\x1a\n" + bytes(200), DicomUndecodable, 415, "dicom_invalid"),
    "truncated-header": (_truncated_header, DicomUndecodable, 415, "dicom_truncated"),
    "truncated-pixels": (_truncated_pixels, DicomUndecodable, 415, "dicom_truncated"),
    "corrupt-jpeg": (_corrupt_jpeg, DicomUndecodable, 415, "dicom_undecodable"),
    "bad-photometric": (_unsupported_photometric, DicomUndecodable, 415, "dicom_unsupported_photometric"),
    "structured-report": (lambda rgb: _structured_report(), DicomUnusable, 422, "dicom_not_image"),
    "multiframe": (_multiframe, DicomUnusable, 422, "dicom_multiframe"),
    "ct-image": (_ct_image, DicomUnusable, 422, "dicom_not_photograph"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_read_dicom_refuses_bad_input_without_patient_data(
    case: str, fundus_rgb: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    build, error_type, status, code = BAD_CASES[case]
    data = build(fundus_rgb)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(error_type) as excinfo:
        warnings.simplefilter("always")
        read_dicom(data)
    error = excinfo.value
    assert isinstance(error, DicomError)
    assert (error.status_code, error.code) == (status, code)
    secret = SECRET_NAME.split("^")[0]
    assert secret not in error.message and secret not in str(error)
    assert secret not in caplog.text
    assert all(secret not in str(w.message) for w in caught)


def test_read_dicom_refuses_oversized_image_before_decoding(fundus_rgb: np.ndarray) -> None:
    data = make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))
    with pytest.raises(DicomTooLarge) as excinfo:
        read_dicom(data, max_pixels=100)
    assert excinfo.value.status_code == 413
    exact = fundus_rgb.shape[0] * fundus_rgb.shape[1]
    assert read_dicom(data, max_pixels=exact).pixels.shape == fundus_rgb.shape


def test_read_dicom_does_not_warn_with_malformed_patient_values(fundus_rgb: np.ndarray) -> None:
    ds: Dataset = base_dataset(SecondaryCaptureImageStorage, patient_name=SECRET_NAME * 4)  # > 64 chars
    ds.PatientBirthDate = "Zzyzxsecret"  # not a date
    ds.Rows, ds.Columns = fundus_rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = fundus_rgb.tobytes()
    data = to_part10(ds, ExplicitVRLittleEndian)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photo = read_dicom(data)
    assert np.array_equal(photo.pixels, fundus_rgb)
    assert all("Zzyzxsecret" not in str(w.message) for w in caught)
