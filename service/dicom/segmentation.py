"""Vessel map → a DICOM Segmentation instance (highdicom) referencing the source photograph.

Why a Segmentation and not a Secondary Capture mask: a SEG says what the pixels mean (segment
"Retinal vessels", property Blood Vessel in the Retina, algorithm name, family and weights version),
is overlaid on its source image by PACS viewers (it references the source frame with Spatial
Locations Preserved), and carries the probability map losslessly as FRACTIONAL/PROBABILITY. An SC
mask is only a gray picture a viewer shows side by side and a reader cannot tell from an image.

A thresholded map (values only 0 and 255) is written as a BINARY segmentation, anything else as
FRACTIONAL with maximum value 255, so ``/segment`` and ``/segment?threshold=`` keep their meaning.

highdicom treats every IOD that allows multiple frames as an enhanced multi-frame image with
functional groups; Ophthalmic Photography allows multiple frames but has none, so highdicom is given
the header under a single-frame class and the Segmentation's references are then pointed back at
the true source SOP class.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage, generate_uid

from service.dicom.errors import DicomWriteError
from service.dicom.provenance import (
    STUDY_KEYWORDS,
    Provenance,
    contributing_equipment,
    copy_patient_and_study,
    derived_series_number,
    derived_series_uid,
    now_in_source_zone,
)
from service.dicom.writer import DerivedInstance, _part10

SEGMENTATION_SERIES_OFFSET = 2000
_STUDY_ONLY = set(STUDY_KEYWORDS) - {"StudyInstanceUID"}
_PLACEHOLDERS = (  # read by highdicom; empty in its view, the real values are copied afterwards
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def write_vessel_segmentation(
    source: Dataset,
    vessel_map: np.ndarray,
    provenance: Provenance,
    *,
    binary: bool | None = None,
    sop_instance_uid: str | None = None,
) -> DerivedInstance:
    """Write the vessel map as a Segmentation of ``source``.

    Args:
        source: the input photograph's header.
        vessel_map: uint8 [H, W] (or [H, W, 1]) probability ×255 or 0/255 mask, at the source's
            Rows × Columns (a SEG must align with its source pixels).
        provenance: algorithm name (e.g. the vessel branch) and weights version.
        binary: force BINARY (True) or FRACTIONAL (False); default: BINARY when only 0/255 occur.
        sop_instance_uid: fixed instance UID (tests); a new one by default.

    Raises:
        DicomWriteError: the map's shape or dtype does not fit the source.
    """
    mask = np.asarray(vessel_map)
    if mask.ndim == 3 and mask.shape[2] in (1, 3):
        mask = mask[:, :, 0]
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DicomWriteError(f"expected a uint8 [H, W] vessel map, got {mask.dtype} {mask.shape}")
    rows, columns = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, columns):
        raise DicomWriteError(
            f"a Segmentation must match its source image: vessel map {mask.shape[:2]}, "
            f"source ({rows}, {columns}); use output_size=original"
        )
    if binary is None:
        binary = bool(np.isin(mask, (0, 255)).all())

    moment, offset = now_in_source_zone(source)
    stand_in = _single_frame_view(source)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=provenance.algorithm_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=provenance.algorithm_version[:64],
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Retinal vessels",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.BloodVessel,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Retina],
    )
    pixel_array = mask > 127 if binary else mask.astype(np.float32) / 255.0
    instance_uid = sop_instance_uid or generate_uid()
    seg = hd.seg.Segmentation(
        source_images=[stand_in],
        pixel_array=pixel_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.BINARY if binary else hd.seg.SegmentationTypeValues.FRACTIONAL
        ),
        segment_descriptions=[segment],
        series_instance_uid=derived_series_uid(source, "vessels", provenance),
        series_number=derived_series_number(source, SEGMENTATION_SERIES_OFFSET),
        sop_instance_uid=instance_uid,
        instance_number=int(source.get("InstanceNumber", 1) or 1),
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.algorithm_name[:64],
        software_versions=(provenance.resolved_software_version()[:64], provenance.algorithm_version[:64]),
        device_serial_number="not applicable",
        max_fractional_value=255,
        omit_empty_frames=False,
        content_label="VESSELS",
        content_description=f"Retinal vessels ({provenance.algorithm_name})"[:64],
    )
    copy_patient_and_study(source, seg)
    seg.PatientOrientation = source.get("PatientOrientation", None) or None  # Type 2C without a frame of ref.
    seg.SeriesDescription = f"Vessel segmentation ({provenance.algorithm_name})"[:64]
    if offset is not None:
        seg.TimezoneOffsetFromUTC = offset
    description = provenance.description or f"Retinal vessel segmentation by {provenance.algorithm_name}"
    seg.ContributingEquipmentSequence = contributing_equipment(
        provenance, moment, f"{description} (weights {provenance.algorithm_version})"
    )
    _restore_source_class(seg, str(source.SOPInstanceUID), str(source.SOPClassUID))
    return DerivedInstance(
        data=_part10(seg, seg.file_meta.TransferSyntaxUID),
        study_instance_uid=str(seg.StudyInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(instance_uid),
        sop_class_uid=str(SegmentationStorage),
        transfer_syntax_uid=str(seg.file_meta.TransferSyntaxUID),
    )


def _single_frame_view(source: Dataset) -> Dataset:
    """What highdicom sees of the source: image and series attributes under a single-frame SC class.

    Patient and study attributes other than the Study Instance UID are left out: highdicom parses
    them (a malformed birth date would raise with the value in the message), and the source's are
    copied verbatim afterwards. Elements are shared, never mutated: replaced ones are removed from
    the copy's own dict first.
    """
    view = Dataset(
        {
            element.tag: element
            for element in source
            if element.tag.group not in (0x0010, 0x0012) and element.keyword not in _STUDY_ONLY
        }
    )
    for keyword in _PLACEHOLDERS:
        setattr(view, keyword, None)
    del view.SOPClassUID
    view.SOPClassUID = SecondaryCaptureImageStorage
    if "NumberOfFrames" in view:
        del view.NumberOfFrames
    return view


def _restore_source_class(dataset: Dataset, instance_uid: str, sop_class: str) -> None:
    """Point every reference to the source instance back at its real SOP class."""

    def visit(ds: Dataset, element: object) -> None:
        if str(ds.get("ReferencedSOPInstanceUID", "")) == instance_uid and "ReferencedSOPClassUID" in ds:
            ds.ReferencedSOPClassUID = sop_class

    dataset.walk(visit)
