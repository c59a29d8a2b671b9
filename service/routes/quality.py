"""``POST /quality``: is a fundus photograph good enough to read as it is?

The grader (:mod:`model.quality`) runs in the API process on the FOV-cropped working image, the same
crop ``/enhance`` uses, so the grade here equals ``X-Quality-Before`` there.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.errors import ApiError
from service.queue.base import BackendUnavailable
from service.routes.images import FovQuery, decode_prepare, reject_unknown_query
from service.schemas import IMAGE_REQUEST_BODY, QualityResponse, image_responses
from service.state import get_state

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["images"])


@router.post(
    "/quality",
    summary="Quality grade of a fundus photograph (good / poor, calibrated probability)",
    response_model=QualityResponse,
    responses={k: v for k, v in image_responses("", ()).items() if k != 200},
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def quality(request: Request, fov: FovQuery = "auto") -> QualityResponse:
    reject_unknown_query(request, {"fov"})
    state = get_state(request)
    if state.info is None or not state.ready:
        raise BackendUnavailable("the service is still starting", retry_after_s=1)
    if state.quality is None:
        raise ApiError(
            404,
            "not_enabled",
            "quality grading is not enabled on this server (FUNDUS_QUALITY_WEIGHTS is empty)",
        )
    _, _, grade = await decode_prepare(state, request, fov, grade=True)
    assert grade is not None
    return QualityResponse(**grade.as_json())
