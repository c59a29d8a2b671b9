"""Route-side PACS push: decide whether to store a DICOM result, STOW it, and build the HTTP answer.

Rules:
- ``store=false`` never stores; ``store=true`` stores (400 when no DICOMweb endpoint is configured or
  the answer is not DICOM); no ``store`` stores every DICOM answer when ``FUNDUS_DICOMWEB_URL`` is set.
- The outcome is always reported in ``X-Store-Status`` (``stored|partial|failed|unreachable; http=..;
  stored=..; failed=..``); with ``report=json`` the body is JSON describing the instance and the outcome.
- A store that is not complete answers 502 and still carries the result: the DICOM file itself (with
  ``X-Error-Code: pacs_store_failed``), or with ``report=json`` the error body plus the file in base64.
  A result is never silently lost.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import pydicom
from fastapi import Response
from fastapi.responses import JSONResponse

from service.dicom.stow import StowOutcome, stow_rs
from service.errors import ApiError, error_body

DICOM_MEDIA_TYPE = "application/dicom"
STORE_HEADER = "X-Store-Status"
Report = Literal["file", "json"]


def validate_store_request(
    store: bool | None,
    dicomweb_url: str | None,
    output_media_type: str | None = None,
    report: Report = "file",
) -> None:
    """Refuse, before any model work, a ``store``/``report`` combination the service cannot honour (400).

    ``output_media_type`` may be None when the answer's format is not known yet (checked again later).
    """
    dicom_out = output_media_type in (None, DICOM_MEDIA_TYPE)
    if store is True:
        if not dicomweb_url:
            raise ApiError(400, "store_unavailable", "store=true but no DICOMweb endpoint is configured")
        if not dicom_out:
            raise ApiError(400, "store_needs_dicom", "store=true needs a DICOM answer (format=dicom)")
    if report == "json" and (store is False or not dicomweb_url or not dicom_out):
        raise ApiError(
            400, "bad_request", "report=json describes a PACS store; it needs a stored DICOM answer"
        )


def wants_store(store: bool | None, dicomweb_url: str | None, media_type: str) -> bool:
    """Whether this answer goes to the PACS (after :func:`validate_store_request` passed)."""
    return store is not False and bool(dicomweb_url) and media_type == DICOM_MEDIA_TYPE


async def respond_with_store(
    body: bytes,
    media_type: str,
    headers: Mapping[str, str],
    *,
    dicomweb_url: str | None,
    store: bool | None = None,
    report: Report = "file",
    timeout_s: float = 30.0,
    client: httpx.AsyncClient | None = None,
) -> Response:
    """The route's final answer for an encoded result, pushed to the PACS when the rules say so.

    Args:
        body / media_type / headers: the encoded result and the headers the route already set.
        dicomweb_url: DICOMweb root (``FUNDUS_DICOMWEB_URL``), None when not configured.
        store: the request's ``store`` query (None when absent).
        report: ``file`` (the result is the body) or ``json`` (a JSON report; the file in base64
            only when the store failed).
        timeout_s: STOW-RS request timeout.
        client: shared HTTP client for connection reuse.
    """
    validate_store_request(store, dicomweb_url, media_type, report)
    if not wants_store(store, dicomweb_url, media_type):
        return Response(content=body, media_type=media_type, headers=dict(headers))
    assert dicomweb_url is not None
    outcome = await stow_rs(dicomweb_url, [body], client=client, timeout_s=timeout_s)
    out_headers = {**headers, STORE_HEADER: outcome.header_value()}
    if outcome.ok:
        if report == "json":
            return JSONResponse(_report(body, outcome), headers=out_headers)
        return Response(content=body, media_type=media_type, headers=out_headers)
    message = f"the result could not be stored in the PACS: {outcome.detail}; it is returned in this response"
    if report == "json":
        payload = error_body("pacs_store_failed", message)
        payload.update(_report(body, outcome))
        payload["result"]["data_base64"] = base64.b64encode(body).decode("ascii")
        return JSONResponse(payload, status_code=502, headers=out_headers)
    out_headers["X-Error-Code"] = "pacs_store_failed"
    return Response(content=body, media_type=media_type, status_code=502, headers=out_headers)


def _report(body: bytes, outcome: StowOutcome) -> dict[str, Any]:
    """Instance identity (UIDs, no patient attributes) and the store outcome."""
    header = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
    result = {
        "media_type": DICOM_MEDIA_TYPE,
        "size_bytes": len(body),
        "study_instance_uid": str(header.get("StudyInstanceUID", "")),
        "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
        "sop_instance_uid": str(header.get("SOPInstanceUID", "")),
        "sop_class_uid": str(header.get("SOPClassUID", "")),
    }
    return {"result": result, "store": outcome.as_json()}
