"""Enhanced photograph → a derived DICOM instance in a new series of the source's study.

The instance is a Secondary Capture Image (SOP class 1.2.840.10008.5.1.4.1.1.7) whatever the source
class was. An Ophthalmic Photography instance would have to repeat acquisition modules (ocular
region, camera and acquisition parameters) that describe a camera exposure this image did not have;
SC is the IOD the standard provides for images made by software, and everything it requires is
written here, so the result is valid even when the source header is incomplete. Modality and
Laterality are copied, so ophthalmology hanging protocols still find the image next to its source.

Recorded: Image Type DERIVED\\SECONDARY, Derivation Description and Code (DCM 110001 "Image
Processing", plus 113085 "Spatial resampling" when the geometry changed), Source Image Sequence
pointing at the input, Contributing Equipment with the algorithm name and weights version, a Series
Description saying "Enhanced", and the lossy-compression history (PS3.3 C.7.6.1.1.5).

Output transfer syntax: explicit VR little endian (default) or JPEG baseline (``jpeg``; 4:2:2
YBR_FULL_422 for colour, as PS3.5 §8.2.1 describes for lossy JPEG).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.dicom.errors import DicomWriteError
from service.dicom.provenance import (
    MANUFACTURER,
    Provenance,
    code_item,
    contributing_equipment,
    copy_patient_and_study,
    derived_series_number,
    derived_series_uid,
    laterality,
    now_in_source_zone,
    set_sop_common,
    source_image_sequence,
)

OutputSyntax = Literal["explicit", "jpeg"]

TRANSFER_SYNTAXES: dict[str, UID] = {"explicit": ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit}
"""Output transfer syntax names (the ``transfer_syntax`` argument) and their UIDs."""

DerivedKind = Literal["enhanced", "degraded"]
_SERIES_LABELS: dict[str, str] = {"enhanced": "Enhanced", "degraded": "Synthetically degraded"}
_SERIES_OFFSETS: dict[str, int] = {"enhanced": 1000, "degraded": 3000}
#: ImageType values 3 and 4 of a synthetically degraded copy, and its series description.
SYNTHETIC_IMAGE_TYPE = ["SYNTHETIC", "DEGRADED"]
SYNTHETIC_SERIES_DESCRIPTION = "SYNTHETIC TEST DATA - degraded copy, not for diagnosis"
_LOSSY_SOURCE_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit}


@dataclass(frozen=True)
class DerivedInstance:
    """A written Part-10 file and the identifiers a caller reports (UIDs are not patient data).

    Attributes:
        data: the Part-10 bytes.
        study_instance_uid / series_instance_uid / sop_instance_uid / sop_class_uid: its identity.
        transfer_syntax_uid: how its pixel data is encoded.
    """

    data: bytes
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


def resolve_transfer_syntax(name: str | None) -> OutputSyntax:
    """``explicit``/``jpeg`` or their UIDs (as sent in an Accept ``transfer-syntax`` parameter).

    Raises:
        DicomWriteError: any other value (a 400 for the caller).
    """
    if not name:
        return "explicit"
    wanted = name.strip().strip('"').lower()
    for key, uid in TRANSFER_SYNTAXES.items():
        if wanted in (key, str(uid)):
            return key  # type: ignore[return-value]
    raise DicomWriteError(
        f"unsupported DICOM output transfer syntax {name!r}; use one of {sorted(TRANSFER_SYNTAXES)}"
    )


def write_enhanced(
    source: Dataset,
    pixels: np.ndarray,
    provenance: Provenance,
    *,
    kind: DerivedKind = "enhanced",
    transfer_syntax: OutputSyntax = "explicit",
    monochrome: bool | None = None,
    jpeg_quality: int = 92,
    sop_instance_uid: str | None = None,
) -> DerivedInstance:
    """Write ``pixels`` as the enhanced derivative of ``source``.

    Args:
        source: the input's header (pixel data not needed).
        pixels: uint8 [H, W, 3] RGB or [H, W] gray; any size (the working-size crop included).
        provenance: algorithm name, weights version, description.
        kind: ``enhanced``, or ``degraded`` for the synthetic degradation (its own derived series).
        transfer_syntax: ``explicit`` (uncompressed) or ``jpeg`` (baseline, lossy).
        monochrome: write MONOCHROME2 (the result's luma); default: when the source was monochrome.
        jpeg_quality: libjpeg quality for ``jpeg``.
        sop_instance_uid: fixed instance UID (tests); a new one by default.

    Returns:
        the derived instance and its UIDs.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise DicomWriteError(f"unknown transfer syntax {transfer_syntax!r}")
    image = _as_uint8_image(pixels)
    if monochrome is None:
        monochrome = image.ndim == 2 or str(source.get("PhotometricInterpretation", "")).startswith(
            "MONOCHROME"
        )
    if monochrome and image.ndim == 3:
        image = _luma(image)
    if not monochrome and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)

    moment, offset = now_in_source_zone(source)
    derived = Dataset()
    instance_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    set_sop_common(derived, SecondaryCaptureImageStorage, instance_uid, moment, offset)
    copy_patient_and_study(source, derived)

    label = _SERIES_LABELS[kind]
    description = provenance.description or f"{label} by {provenance.algorithm_name}"
    description = f"{description} (weights {provenance.algorithm_version})"
    derived.Modality = str(source.get("Modality", "") or "OT")
    derived.SeriesInstanceUID = derived_series_uid(source, kind, provenance)
    derived.SeriesNumber = derived_series_number(source, _SERIES_OFFSETS[kind])
    # A degraded copy is synthetic test data: say so where every PACS viewer shows it.
    derived.SeriesDescription = (
        SYNTHETIC_SERIES_DESCRIPTION if kind == "degraded" else f"{label} ({provenance.algorithm_name})"[:64]
    )
    derived.SeriesDate = moment.strftime("%Y%m%d")
    derived.SeriesTime = moment.strftime("%H%M%S")
    # Type 2C for a paired organ: the eye's side, or empty when the source does not say.
    derived.Laterality = laterality(source)
    derived.Manufacturer = provenance.manufacturer
    derived.SoftwareVersions = [
        provenance.resolved_software_version()[:64],
        provenance.algorithm_version[:64],
    ]
    derived.ConversionType = "WSD"
    derived.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    derived.SecondaryCaptureDeviceManufacturerModelName = provenance.algorithm_name[:64]
    derived.SecondaryCaptureDeviceSoftwareVersions = provenance.algorithm_version[:64]
    derived.DateOfSecondaryCapture = moment.strftime("%Y%m%d")
    derived.TimeOfSecondaryCapture = moment.strftime("%H%M%S")

    derived.InstanceNumber = _instance_number(source)
    derived.PatientOrientation = source.get("PatientOrientation", None) or None
    derived.ContentDate = moment.strftime("%Y%m%d")
    derived.ContentTime = moment.strftime("%H%M%S")
    derived.ImageType = ["DERIVED", "SECONDARY", *(SYNTHETIC_IMAGE_TYPE if kind == "degraded" else [])]
    derived.DerivationDescription = description[:1024]
    resampled = image.shape[:2] != (int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0))
    codes = [code_item("110001", "DCM", "Image Processing")]
    if resampled:
        codes.append(code_item("113085", "DCM", "Spatial resampling"))
    derived.DerivationCodeSequence = Sequence(codes)
    derived.SourceImageSequence = source_image_sequence(source)
    derived.ContributingEquipmentSequence = contributing_equipment(provenance, moment, description)
    if "BurnedInAnnotation" in source:
        derived.BurnedInAnnotation = source.BurnedInAnnotation

    syntax = TRANSFER_SYNTAXES[transfer_syntax]
    _set_pixels(derived, image, transfer_syntax, jpeg_quality)
    _set_lossy_history(derived, source, image, transfer_syntax)
    return DerivedInstance(
        data=_part10(derived, syntax),
        study_instance_uid=str(derived.StudyInstanceUID) if "StudyInstanceUID" in derived else "",
        series_instance_uid=str(derived.SeriesInstanceUID),
        sop_instance_uid=str(instance_uid),
        sop_class_uid=str(SecondaryCaptureImageStorage),
        transfer_syntax_uid=str(syntax),
    )


def _as_uint8_image(pixels: np.ndarray) -> np.ndarray:
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise DicomWriteError(f"expected [H, W] or [H, W, 3] pixels, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise DicomWriteError(f"expected uint8 pixels, got {array.dtype}")
    return np.ascontiguousarray(array)


def _luma(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)


def _instance_number(source: Dataset) -> int | None:
    try:
        return int(source.get("InstanceNumber", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _set_pixels(derived: Dataset, image: np.ndarray, transfer_syntax: OutputSyntax, quality: int) -> None:
    colour = image.ndim == 3
    derived.Rows, derived.Columns = int(image.shape[0]), int(image.shape[1])
    derived.SamplesPerPixel = 3 if colour else 1
    derived.BitsAllocated = 8
    derived.BitsStored = 8
    derived.HighBit = 7
    derived.PixelRepresentation = 0
    if colour:
        derived.PlanarConfiguration = 0
    if transfer_syntax == "explicit":
        derived.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
        derived.PixelData = image.tobytes()
        return
    buffer = io.BytesIO()
    if colour:
        # 4:2:2 chroma subsampling: YBR_FULL_422 is what PS3.5 prescribes for such a JPEG stream.
        Image.fromarray(image, mode="RGB").save(buffer, "JPEG", quality=quality, subsampling=1)
        derived.PhotometricInterpretation = "YBR_FULL_422"
    else:
        Image.fromarray(image, mode="L").save(buffer, "JPEG", quality=quality)
        derived.PhotometricInterpretation = "MONOCHROME2"
    derived.PixelData = encapsulate([buffer.getvalue()])
    derived["PixelData"].VR = "OB"
    derived["PixelData"].is_undefined_length = True


def _set_lossy_history(
    derived: Dataset, source: Dataset, image: np.ndarray, transfer_syntax: OutputSyntax
) -> None:
    """Lossy Image Compression: once lossy, always lossy; ratios and methods accumulate."""
    source_syntax = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
    source_lossy = (
        str(source.get("LossyImageCompression", "")) == "01" or source_syntax in _LOSSY_SOURCE_SYNTAXES
    )
    ratios = [str(v) for v in _as_list(source.get("LossyImageCompressionRatio"))] if source_lossy else []
    methods = [str(v) for v in _as_list(source.get("LossyImageCompressionMethod"))] if source_lossy else []
    if transfer_syntax == "jpeg":
        compressed = len(derived.PixelData)
        ratio = image.nbytes / max(compressed, 1)
        ratios.append(f"{ratio:.2f}"[:16])
        methods.append("ISO_10918_1")
    if source_lossy or transfer_syntax == "jpeg":
        derived.LossyImageCompression = "01"
        if ratios:
            derived.LossyImageCompressionRatio = ratios
        if methods:
            derived.LossyImageCompressionMethod = methods
    else:
        derived.LossyImageCompression = "00"


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return list(value)  # type: ignore[call-overload]
    return [value]


def _part10(derived: Dataset, transfer_syntax: UID) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = derived.SOPClassUID
    meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    derived.file_meta = meta
    buffer = io.BytesIO()
    derived.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
