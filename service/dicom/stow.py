"""Async DICOMweb STOW-RS client: push Part-10 instances to a PACS and say exactly what happened.

``POST {root}/studies`` with a ``multipart/related; type="application/dicom"`` body, one part per
instance, answered per PS3.18 §10.5 with an ``application/dicom+json`` Store Instances Response:
Referenced SOP Sequence (stored), Failed SOP Sequence (refused, with a Failure Reason code).

The outcome distinguishes:
- ``stored``: every instance accepted (HTTP 200, or 202 with warnings only);
- ``partial``: some accepted, some refused (HTTP 202 or a 200 listing failures);
- ``failed``: the PACS answered but stored nothing (409, another 4xx/5xx, or all listed as failed);
- ``unreachable``: no answer (connection refused, DNS, TLS, timeout).

Nothing here logs or reports patient data, URLs (they may hold credentials) or the PACS's own
error text (it may quote attributes); only statuses, counts, UIDs in the outcome and DICOM codes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

log = logging.getLogger("fundus.dicom.stow")

StowStatus = Literal["stored", "partial", "failed", "unreachable"]

_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS = "00081150"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StowInstanceResult:
    """One instance in a Store Instances Response.

    Attributes:
        sop_instance_uid / sop_class_uid: the instance, as the PACS reported it.
        retrieve_url: WADO-RS URL of a stored instance, when the PACS gave one.
        reason: Failure Reason (failed) or Warning Reason (stored) code, e.g. 0xA700 → 42752.
    """

    sop_instance_uid: str
    sop_class_uid: str = ""
    retrieve_url: str | None = None
    reason: int | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"sop_instance_uid": self.sop_instance_uid}
        if self.sop_class_uid:
            body["sop_class_uid"] = self.sop_class_uid
        if self.retrieve_url:
            body["retrieve_url"] = self.retrieve_url
        if self.reason is not None:
            body["reason"] = f"0x{self.reason:04X}"
        return body


@dataclass(frozen=True)
class StowOutcome:
    """What a STOW-RS request achieved.

    Attributes:
        status: ``stored``, ``partial``, ``failed`` or ``unreachable`` (see the module docstring).
        http_status: the PACS's HTTP status, None when it never answered.
        stored / failed: per-instance results.
        detail: one fixed sentence, free of patient data and credentials.
        duration_s: wall time of the request.
    """

    status: StowStatus
    http_status: int | None
    stored: tuple[StowInstanceResult, ...] = ()
    failed: tuple[StowInstanceResult, ...] = ()
    detail: str = ""
    duration_s: float = 0.0
    warnings: tuple[StowInstanceResult, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "stored"

    def header_value(self) -> str:
        """``X-Store-Status`` value, e.g. ``stored; http=200; stored=1; failed=0``."""
        http = "none" if self.http_status is None else str(self.http_status)
        return f"{self.status}; http={http}; stored={len(self.stored)}; failed={len(self.failed)}"

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "http_status": self.http_status,
            "detail": self.detail,
            "stored": [item.as_json() for item in self.stored],
            "failed": [item.as_json() for item in self.failed],
            "duration_ms": round(self.duration_s * 1000.0, 1),
        }


def multipart_related(instances: Sequence[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """The STOW-RS request body and its Content-Type for ``instances`` (Part-10 bytes each)."""
    boundary = boundary or f"fundus-{uuid.uuid4().hex}"
    parts = [
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
        for data in instances
    ]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


async def stow_rs(
    dicomweb_root: str,
    instances: Sequence[bytes],
    *,
    study_instance_uid: str | None = None,
    client: httpx.AsyncClient | None = None,
    timeout_s: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> StowOutcome:
    """Store ``instances`` through STOW-RS at ``{dicomweb_root}/studies[/{study}]``.

    Args:
        dicomweb_root: DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``.
        instances: Part-10 files.
        study_instance_uid: post to the study resource (the PACS then refuses other studies).
        client: a shared client (connection reuse); a temporary one otherwise.
        timeout_s: whole-request timeout when this function makes the client.
        headers: extra request headers (e.g. Authorization).

    Returns:
        the outcome; this function does not raise for PACS or network failures.
    """
    if not instances:
        return StowOutcome(status="stored", http_status=None, detail="nothing to store")
    url = dicomweb_root.rstrip("/") + "/studies"
    if study_instance_uid:
        url += f"/{study_instance_uid}"
    body, content_type = multipart_related(instances)
    request_headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    request_headers.update(headers or {})
    started = time.perf_counter()
    own_client = client is None
    http = client or httpx.AsyncClient(timeout=timeout_s)
    try:
        response = await http.post(url, content=body, headers=request_headers)
    except httpx.HTTPError as exc:
        outcome = StowOutcome(
            status="unreachable",
            http_status=None,
            detail=f"the PACS could not be reached ({type(exc).__name__})",
            duration_s=time.perf_counter() - started,
        )
        _log(outcome)
        return outcome
    finally:
        if own_client:
            await http.aclose()
    outcome = interpret_response(response.status_code, response.content, len(instances))
    outcome = StowOutcome(
        status=outcome.status,
        http_status=outcome.http_status,
        stored=outcome.stored,
        failed=outcome.failed,
        warnings=outcome.warnings,
        detail=outcome.detail,
        duration_s=time.perf_counter() - started,
    )
    _log(outcome)
    return outcome


def interpret_response(http_status: int, content: bytes, submitted: int) -> StowOutcome:
    """Classify a Store Instances Response (status code + DICOM JSON body).

    The per-instance lists win over the status code: some PACS answer 400 yet store the valid parts
    of a request (partial), and a 200 whose body lists nothing stored stored nothing (failed).
    """
    body = _json_object(content)
    stored = tuple(_instances(body, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON))
    failed = tuple(_instances(body, _FAILED_SOP_SEQUENCE, _FAILURE_REASON))
    warnings = tuple(item for item in stored if item.reason is not None)
    accepted = http_status in (200, 202)
    if accepted and not failed and not body and http_status == 200:
        # No Store Instances Response at all: a plain 200 means every instance was accepted.
        return StowOutcome("stored", http_status, detail=f"{submitted} instance(s) stored")
    if accepted and not failed and stored and len(stored) >= submitted:
        note = " with warnings" if warnings else ""
        return StowOutcome(
            "stored", http_status, stored, warnings=warnings, detail=f"{len(stored)} instance(s) stored{note}"
        )
    if stored:
        return StowOutcome(
            "partial",
            http_status,
            stored,
            failed,
            warnings=warnings,
            detail=f"the PACS stored {len(stored)} of {submitted} instance(s) (HTTP {http_status})",
        )
    return StowOutcome(
        "failed",
        http_status,
        (),
        failed,
        detail=f"the PACS stored none of {submitted} instance(s) (HTTP {http_status})",
    )


def _json_object(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content) if content else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = value[0]
    return value if isinstance(value, dict) else {}


def _values(item: Mapping[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value", [])
    return values if isinstance(values, list) else []


def _first_str(item: Mapping[str, Any], tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]) if values and values[0] is not None else ""


def _instances(body: Mapping[str, Any], sequence_tag: str, reason_tag: str) -> list[StowInstanceResult]:
    results = []
    for item in _values(body, sequence_tag):
        if not isinstance(item, dict):
            continue
        reason_values = _values(item, reason_tag)
        try:
            reason = int(reason_values[0]) if reason_values else None
        except (TypeError, ValueError):
            reason = None
        results.append(
            StowInstanceResult(
                sop_instance_uid=_first_str(item, _REFERENCED_SOP_INSTANCE),
                sop_class_uid=_first_str(item, _REFERENCED_SOP_CLASS),
                retrieve_url=_first_str(item, _RETRIEVE_URL) or None,
                reason=reason,
            )
        )
    return results


def _log(outcome: StowOutcome) -> None:
    level = logging.INFO if outcome.ok else logging.WARNING
    log.log(
        level,
        "stow-rs %s",
        outcome.status,
        extra={
            "stow_status": outcome.status,
            "http_status": outcome.http_status,
            "stored": len(outcome.stored),
            "failed": len(outcome.failed),
            "duration_ms": round(outcome.duration_s * 1000.0, 1),
        },
    )
