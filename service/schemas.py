"""Response models and OpenAPI fragments (request bodies are read by hand, so they are described here)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code")
    message: str = Field(description="human-readable explanation")
    request_id: str | None = Field(description="the X-Request-ID of the failed request")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "no_fundus",
                        "message": "no fundus field of view found in the image",
                        "request_id": "3f2a9c1e0b7d4e8f",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


class ModelResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "preset": "lite",
                    "version": "lite-0123456789ab",
                    "sha256": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                    "parameter_count": 756875,
                    "working_size": 512,
                    "device": "cpu",
                    "created": "2026-12-01T00:00:00+00:00",
                    "training": {"phase": "enhance", "steps": 4000, "mean_teacher": True},
                    "metrics": {"validation": {"val/psnr": 30.1, "val/ssim": 0.94}},
                }
            ]
        }
    )
    preset: str
    version: str
    sha256: str
    parameter_count: int
    working_size: int
    device: str
    created: str
    training: dict[str, Any]
    metrics: dict[str, Any]


class QualityResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "grade": "good",
                    "probabilities": {"good": 0.9132, "poor": 0.0868},
                    "model_version": "quality-0123456789ab",
                }
            ]
        }
    )
    grade: str = Field(description="`good` (readable as it is) or `poor` (P(good) < 0.5)")
    probabilities: dict[str, float] = Field(description="calibrated probability of each grade")
    model_version: str = Field(description="version of the quality grader's weights")


class StatusResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})
    status: str


_BINARY = {"type": "string", "format": "binary"}

IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image, as the multipart field `file` or as the raw body with its Content-Type.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "image/tiff": {"schema": _BINARY},
            "application/dicom": {"schema": _BINARY},
        },
    }
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "bad parameters, empty body or malformed multipart",
        401: "missing or invalid API key (when keys are configured)",
        406: "no acceptable output format in Accept",
        408: "the request body arrived too slowly (FUNDUS_BODY_*)",
        409: "Redis queue: a request with this X-Request-ID was already accepted",
        413: "upload or image dimensions over the limit",
        415: "unsupported, mismatched or undecodable media",
        422: "image too small, or clearly not a fundus photograph (send fov=full to process it anyway)",
        429: "queue full; see Retry-After",
        502: "PACS store failed (DICOM with store=true): the result is still in the body, the report in JSON",
        503: "not ready, shutting down or model failure; see Retry-After",
        504: "the request deadline passed",
    }.items()
}


#: Headers of ``/enhance`` answers (see service/trust.py and the README's trust-signal section).
TRUST_HEADERS: dict[str, Any] = {
    name: {"schema": {"type": "string"}, "description": description}
    for name, description in {
        "X-Enhanced": "`true`, or `false` when only_if_needed returned the input unchanged",
        "X-Quality-Before": "grade of the input and its P(good), e.g. `poor;p=0.124`",
        "X-Quality-After": "grade of the output and its P(good)",
        "X-Enhance-Uncertainty": "mean disagreement of the model's two stages inside the FOV (0–1)",
        "X-Structure-Fidelity": "vessel maps of input and output: `dice=…;removed=…;added=…`",
        "X-Structure-Warning": "present when the vessel Dice is below FUNDUS_STRUCTURE_MIN_DICE",
    }.items()
}


def image_responses(
    description: str, media_types: tuple[str, ...], extra_headers: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {
        "description": description,
        "content": {media: {"schema": _BINARY} for media in media_types},
        "headers": {
            "X-Request-ID": {"schema": {"type": "string"}, "description": "echoed or generated request id"},
            "X-Model-Version": {"schema": {"type": "string"}, "description": "served weights version"},
            "Server-Timing": {
                "schema": {"type": "string"},
                "description": "queue, inference, preprocess and postprocess times in ms",
            },
            "X-FOV": {
                "schema": {"type": "string", "enum": ["fitted", "fallback", "full", "none"]},
                "description": "how the field of view was found",
            },
            "X-FOV-Confidence": {"schema": {"type": "string"}, "description": "0–1, for fitted and fallback"},
            **(extra_headers or {}),
        },
    }
    return {200: ok, **_ERRORS}
