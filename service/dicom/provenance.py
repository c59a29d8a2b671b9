"""What a derived instance records about its making, and the attributes it carries over from the source.

Shared by the enhanced-image and the vessel-segmentation writers: the algorithm and weights version
(Contributing Equipment), the Patient and Study modules copied verbatim, deterministic derived-series
UIDs, and timestamps in the source's time zone.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from importlib import metadata

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

MANUFACTURER = "fundus-enhance"

# Patient, Clinical Trial Subject and Patient Study modules are the public elements of these groups.
_PATIENT_GROUPS = (0x0010, 0x0012)

STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
)
"""General Study and Patient Study attributes outside group 0010 copied unchanged."""

_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class Provenance:
    """The processing recorded in a derived instance (never patient data).

    Attributes:
        algorithm_name: e.g. ``T-MAGE-Net``; Contributing Equipment's model name.
        algorithm_version: served weights version (``preset-sha12``).
        description: one line on what was done, for Derivation Description.
        manufacturer: the equipment's manufacturer.
        software_version: the service's package version.
    """

    algorithm_name: str
    algorithm_version: str
    description: str = ""
    manufacturer: str = MANUFACTURER
    software_version: str = ""

    def resolved_software_version(self) -> str:
        if self.software_version:
            return self.software_version
        try:
            return metadata.version("fundus-enhance")
        except metadata.PackageNotFoundError:
            return "unknown"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One Code Sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient, Clinical Trial Subject, General Study and Patient Study modules verbatim.

    The source's Specific Character Set goes along so that names keep their encoding; Type 2
    attributes missing from the source are written empty, as the modules require.
    """
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for element in source:
        tag = element.tag
        if tag.group in _PATIENT_GROUPS and not tag.is_private and tag.element != 0:  # no group lengths
            target.add(_copy_element(element))
    for keyword in STUDY_KEYWORDS:
        if keyword in source:
            target.add(_copy_element(source[keyword]))
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in target:
            setattr(target, keyword, None)


def _copy_element(element: DataElement) -> DataElement:
    return deepcopy(element)


def derived_series_uid(source: Dataset, kind: str, provenance: Provenance) -> UID:
    """Series UID of the derived series: one per source series, kind and weights version.

    Deterministic, so every photograph of a source series processed with the same weights lands in
    the same derived series, whichever request produced it.
    """
    source_series = str(source.get("SeriesInstanceUID", "")) or str(source.get("SOPInstanceUID", ""))
    return generate_uid(
        entropy_srcs=[source_series, kind, provenance.algorithm_name, provenance.algorithm_version]
    )


def derived_series_number(source: Dataset, offset: int) -> int:
    """Source series number + ``offset`` (the usual convention for derived series), within IS range."""
    try:
        base = int(source.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        base = 0
    return min(max(base, 0) + offset, 2**31 - 1)


def now_in_source_zone(source: Dataset, now: datetime | None = None) -> tuple[datetime, str | None]:
    """The current time in the source's Timezone Offset From UTC (which the derived copy keeps).

    Returns:
        (aware datetime, the offset string to write or None when the source has none).
    """
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "")
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        sign = 1 if offset[0] == "+" else -1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        return moment.astimezone(timezone(sign * delta)), offset
    return moment.astimezone(), None


def set_sop_common(
    target: Dataset, sop_class: UID, instance_uid: UID, moment: datetime, offset: str | None
) -> None:
    target.SOPClassUID = sop_class
    target.SOPInstanceUID = instance_uid
    target.InstanceCreationDate = moment.strftime("%Y%m%d")
    target.InstanceCreationTime = moment.strftime("%H%M%S")
    if offset is not None:
        target.TimezoneOffsetFromUTC = offset


def contributing_equipment(provenance: Provenance, moment: datetime, description: str) -> Sequence:
    """Contributing Equipment Sequence naming the algorithm (model name) and weights version."""
    item = Dataset()
    item.Manufacturer = provenance.manufacturer
    item.ManufacturerModelName = provenance.algorithm_name[:64]
    item.SoftwareVersions = [provenance.resolved_software_version()[:64], provenance.algorithm_version[:64]]
    item.PurposeOfReferenceCodeSequence = Sequence([code_item("109102", "DCM", "Processing Equipment")])
    item.ContributionDateTime = moment.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description[:1024]
    return Sequence([item])


def source_image_sequence(source: Dataset) -> Sequence:
    """Source Image Sequence: the input photograph, purpose "Source image for image processing"."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence(
        [code_item("121322", "DCM", "Source image for image processing operation")]
    )
    return Sequence([item])


def laterality(source: Dataset) -> str | None:
    """R or L from the source's series Laterality or Image Laterality, else None."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None
