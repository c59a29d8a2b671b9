"""Errors raised for client DICOM data, each with the HTTP status and a stable machine-readable code.

Messages are fixed sentences: they never quote attribute values or parser exception text, because
either may carry patient data (a parser error can echo a malformed PatientName).
"""

from __future__ import annotations


class DicomError(ValueError):
    """A DICOM upload the service cannot use.

    Attributes:
        status_code: 413 (image too large), 415 (not decodable) or 422 (decodable, not usable).
        code: stable machine-readable reason, e.g. ``dicom_not_image``.
        message: one sentence for the client, free of patient data.
    """

    status_code = 415

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DicomUndecodable(DicomError):
    """Not a readable DICOM Part-10 file, or pixel data in an unsupported or broken encoding (→ 415)."""

    status_code = 415


class DicomUnusable(DicomError):
    """A readable DICOM object that is not one photograph the model can take (→ 422)."""

    status_code = 422


class DicomTooLarge(DicomError):
    """The header announces more pixels than allowed; raised before pixel data is expanded (→ 413)."""

    status_code = 413


class DicomWriteError(ValueError):
    """The result cannot be written as DICOM for this request (wrong shape, unknown transfer syntax).

    Its message is a fixed sentence (no attribute values), safe to return to the client.
    """
