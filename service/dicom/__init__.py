"""DICOM in and out, and PACS push by DICOMweb STOW-RS.

- :mod:`service.dicom.reader`: Part-10 photograph → RGB pixels + source header (415/422/413 errors).
- :mod:`service.dicom.writer`: enhanced (or degraded) result → derived Secondary Capture instance.
- :mod:`service.dicom.segmentation`: vessel map → DICOM Segmentation of the source.
- :mod:`service.dicom.stow`: async STOW-RS client with a stored/partial/failed/unreachable outcome.
- :mod:`service.dicom.codec`: the ``application/dicom`` codec of the service's registry.
- :mod:`service.dicom.pacs`: the routes' store-and-answer step (``store=``, ``X-Store-Status``, 502).
"""

from __future__ import annotations

from service.dicom.errors import DicomError, DicomTooLarge, DicomUndecodable, DicomUnusable
from service.dicom.provenance import Provenance
from service.dicom.reader import DicomPhoto, read_dicom
from service.dicom.segmentation import write_vessel_segmentation
from service.dicom.stow import StowInstanceResult, StowOutcome, stow_rs
from service.dicom.writer import DerivedInstance, write_enhanced

__all__ = [
    "DerivedInstance",
    "DicomError",
    "DicomPhoto",
    "DicomTooLarge",
    "DicomUndecodable",
    "DicomUnusable",
    "Provenance",
    "StowInstanceResult",
    "StowOutcome",
    "read_dicom",
    "stow_rs",
    "write_enhanced",
    "write_vessel_segmentation",
]
