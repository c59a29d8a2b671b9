"""Operational endpoints: liveness, readiness, model description and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.auth import require_api_key, require_metrics_key
from service.errors import error_response
from service.schemas import ErrorResponse, ModelResponse, StatusResponse
from service.state import get_state

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz", response_model=StatusResponse, summary="Liveness: 200 while the process runs (no key needed)"
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=StatusResponse,
    summary="Readiness: weights loaded and warmed, queue backend and a worker answering (no key needed)",
    responses={503: {"model": ErrorResponse, "description": "not ready, with the reason"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = get_state(request)
    if state.draining:
        return error_response(503, "not_ready", "shutting down", {"Retry-After": "5"})
    if not state.ready or state.queue is None:
        return error_response(503, "not_ready", state.not_ready_reason, {"Retry-After": "5"})
    ok, reason = await state.queue.readiness()
    if not ok:
        return error_response(503, "not_ready", reason, {"Retry-After": "5"})
    return JSONResponse({"status": "ready"})


@router.get(
    "/model",
    response_model=ModelResponse,
    summary="The served weights: preset, version, hash, size, training summary and metrics",
    dependencies=[Depends(require_api_key)],
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid API key (when keys are configured)"},
        503: {"model": ErrorResponse, "description": "weights not loaded yet"},
    },
)
async def model_info(request: Request) -> JSONResponse:
    state = get_state(request)
    if state.info is None:
        return error_response(503, "not_ready", "weights not loaded yet", {"Retry-After": "5"})
    return JSONResponse(state.info.as_json())


@router.get(
    "/metrics",
    summary="Prometheus exposition",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={200: {"content": {"text/plain": {}}, "description": "metrics in the Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    body, content_type = get_state(request).metrics.exposition()
    return Response(content=body, media_type=content_type)
