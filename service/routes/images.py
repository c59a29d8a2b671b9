"""``POST /enhance``, ``/segment`` and ``/degrade``.

Each request: read the upload within the size limit → decode, find the FOV and crop to the working
size in the thread pool → one queue job (shared model pass for both model endpoints) → map the
answer back to the input geometry and encode in the thread pool. ``/degrade`` needs no model: it runs
the degradation model on the CPU pool directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response

from model.fov_detect import FovEstimate
from model.quality import QualityGrade
from service.auth import require_api_key
from service.codecs import Codec, CodecError, CodecRegistry, DecodedImage, EncodeContext
from service.errors import ApiError
from service.fidelity import in_input_format
from service.imaging import (
    Prepared,
    decode_upload,
    degrade,
    fov_headers,
    prepare,
    restore_enhanced,
    restore_vessels,
)
from service.logging import current_request_id
from service.queue.base import BackendUnavailable, DeadlineExceeded, InferenceQueue, Job, JobResult, Task
from service.queue.embedded import EmbeddedQueue
from service.schemas import IMAGE_REQUEST_BODY, TRUST_HEADERS, image_responses
from service.state import ServiceState, get_state
from service.trust import TrustReport, derivation_description, enhancement_report, grade_working
from service.upload import BodyLimits, Upload, read_upload

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["images"])

OutputFormat = Literal["png", "jpeg", "tiff", "dicom"]
OutputSizeParam = Literal["original", "model"]
DEGRADATION_TYPES = ("illumination", "spot", "blur")
_IMAGE_MEDIA = ("image/png", "image/jpeg", "image/tiff", "application/dicom")

FormatQuery = Annotated[
    OutputFormat | None,
    Query(description="output format; overrides Accept (default PNG, or DICOM for DICOM input)"),
]
StoreQuery = Annotated[
    bool | None,
    Query(description="push a DICOM answer to the PACS (FUNDUS_DICOMWEB_URL); default: when one is set"),
]
DegradeStoreQuery = Annotated[
    bool | None,
    Query(
        description="push the degraded DICOM to the PACS; only when true (synthetic test data never goes "
        "to an archive by default)"
    ),
]
ReportQuery = Annotated[
    Literal["file", "json"],
    Query(description="`file`: the result is the body; `json`: a JSON report of the PACS store"),
]
FovQuery = Annotated[
    Literal["auto", "full"],
    Query(
        description="`auto`: find the field of view (the answer says how in `X-FOV`: `fitted`, or "
        "`fallback` when uncertain); `full`: skip detection and use the whole frame"
    ),
]
OutputSizeQuery = Annotated[
    OutputSizeParam,
    Query(description="`original`: input width, height and FOV placement; `model`: the working-size crop"),
]


def reject_unknown_query(request: Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown query parameter(s): {', '.join(unknown)}")


def choose_output_codec(registry: CodecRegistry, fmt: str | None, accept: str | None, default: str) -> Codec:
    """``format=`` wins; else the first acceptable type in ``Accept`` (by q); else ``default``."""
    if fmt:
        codec = registry.by_format(fmt)
        if codec is None or not codec.can_encode:
            raise ApiError(400, "unsupported_format", f"output format {fmt!r} is not available")
        return codec
    fallback = registry.by_format(default) or registry.by_format("png")
    assert fallback is not None
    if not accept or not accept.strip():
        return fallback
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate(accept.split(",")):
        media, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranked.append((-quality, index, media.strip().lower()))
    for _, _, media in sorted(ranked):
        if media in ("*/*", "image/*"):
            return fallback
        codec = registry.by_media_type(media)
        if codec is not None and codec.can_encode:
            return codec
    offered = ", ".join(c.media_type for c in registry.codecs if c.can_encode)
    raise ApiError(406, "not_acceptable", f"none of the Accept types can be produced; available: {offered}")


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has gone away (the body is fully read, so only disconnects remain)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def submit_until_disconnect(request: Request, queue: InferenceQueue, job: Job) -> JobResult:
    """Await the job, cancelling it (so the batcher drops it) if the client disconnects first."""
    submit = asyncio.ensure_future(queue.submit(job))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if submit in done:
        return submit.result()
    submit.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await submit
    raise ApiError(499, "client_disconnected", "client closed the connection before the result was ready")


def body_limits(state: ServiceState) -> BodyLimits:
    settings = state.settings
    return BodyLimits(
        total_s=settings.body_timeout_s,
        idle_s=settings.body_idle_timeout_s,
        min_rate_bps=settings.body_min_rate_bps,
        cancelled=lambda: state.draining,
    )


def _deadline(request: Request, state: ServiceState) -> float:
    arrived = getattr(request.state, "arrived", None) or time.time()
    return float(arrived) + state.settings.request_timeout_s


def _server_timing(**durations_s: float) -> str:
    return ", ".join(f"{name};dur={seconds * 1000.0:.1f}" for name, seconds in durations_s.items())


async def decode_prepare(
    state: ServiceState, request: Request, fov: str, grade: bool = False
) -> tuple[Upload, Prepared, QualityGrade | None]:
    """Read, decode and crop the upload; with ``grade``, also grade the working image's quality."""
    upload = await read_upload(request, state.settings.max_upload_bytes, body_limits(state))
    assert state.info is not None
    working_size = state.info.working_size

    def work() -> tuple[Upload, Prepared, QualityGrade | None]:
        decoded = decode_upload(
            state.codecs, upload, max_pixels=state.settings.max_pixels, min_side=state.settings.min_image_side
        )
        prepared = prepare(decoded, working_size, fov)  # type: ignore[arg-type]
        return upload, prepared, grade_working(state.quality, prepared.working) if grade else None

    return await state.cpu(work)


def _default_format(registry: CodecRegistry, decoded: DecodedImage) -> str:
    """PNG, or the input's own format when that format is one clients expect back (DICOM)."""
    own = registry.by_media_type(decoded.media_type)
    if own is not None and own.can_encode and own.format_name == "dicom":
        return own.format_name
    return "png"


def _encode_extra(codec: Codec, request: Request) -> dict[str, Any]:
    """Format-specific encoder options taken from the request (DICOM: the transfer syntax in Accept)."""
    if codec.format_name != "dicom":
        return {}
    from service.dicom.codec import transfer_syntax_from_accept

    return {"transfer_syntax": transfer_syntax_from_accept(request.headers.get("accept"))}


def _check_store(state: ServiceState, store: bool | None, report: str) -> None:
    """Refuse an impossible PACS-store request before any model work (400)."""
    if store is None and report == "file":
        return
    from service.dicom.pacs import validate_store_request

    validate_store_request(store, state.settings.dicomweb_url, None, report)  # type: ignore[arg-type]


async def _deliver(
    state: ServiceState,
    body: bytes,
    codec: Codec,
    headers: dict[str, str],
    store: bool | None,
    report: str,
) -> Response:
    """The answer, after a PACS store when the request or the configuration asks for one."""
    if codec.format_name != "dicom" and store is None and report == "file":
        return Response(content=body, media_type=codec.media_type, headers=headers)
    from service.dicom.pacs import respond_with_store

    return await respond_with_store(
        body,
        codec.media_type,
        headers,
        dicomweb_url=state.settings.dicomweb_url,
        store=store,
        report=report,  # type: ignore[arg-type]
    )


def _encode(codec: Codec, pixels: np.ndarray, original: DecodedImage | None, context: EncodeContext) -> bytes:
    try:
        return codec.encode(pixels, original=original, context=context)
    except CodecError as exc:
        raise ApiError(400, "unsupported_format", f"cannot produce {codec.format_name}: {exc}") from None


async def _model_request(
    request: Request,
    task: Task,
    fmt: str | None,
    output_size: str,
    threshold: float | None = None,
    store: bool | None = None,
    report: str = "file",
    fov: str = "auto",
    only_if_needed: bool | None = None,
    output: str = "image",
) -> Response:
    """``only_if_needed`` None: the deployment's default for enhancements (FUNDUS_ENHANCE_ONLY_IF_NEEDED)."""
    state = get_state(request)
    if only_if_needed is None:
        only_if_needed = task is Task.ENHANCE and state.settings.enhance_only_if_needed
    if state.queue is None or state.info is None or not state.ready:
        raise BackendUnavailable("the model is not loaded yet", retry_after_s=1)
    _check_store(state, store, report)
    _check_trust_options(state, only_if_needed, output, fmt)
    enhance = task is Task.ENHANCE
    metrics = state.metrics
    queue = state.queue
    request_id = current_request_id() or secrets.token_hex(8)
    # Tell the embedded batcher a job is on its way, so an idle model waits for it rather than
    # running a smaller batch; a lone request is run at once.
    hinted = isinstance(queue, EmbeddedQueue)
    if hinted:
        queue.announce(request_id)
    try:
        clock = time.perf_counter()
        # Only a request that may skip the model needs the grade before it; otherwise the model
        # process grades input and output inside its pass.
        upload, prepared, before = await decode_prepare(state, request, fov, grade=enhance and only_if_needed)
        default_format = "png" if output == "uncertainty" else _default_format(state.codecs, prepared.decoded)
        codec = choose_output_codec(state.codecs, fmt, request.headers.get("accept"), default_format)
        preprocess_s = time.perf_counter() - clock
        metrics.preprocess_duration.observe(preprocess_s)
        if only_if_needed and output == "image" and before is not None and before.grade == "good":
            return await _already_good(
                state, request, upload, prepared, before, codec, output_size, store, report
            )
        job = Job(
            request_id=request_id,
            task=task,
            pixels=prepared.model_input(),
            deadline=_deadline(request, state),
        )
        result = await submit_until_disconnect(request, queue, job)
    finally:
        if hinted:
            queue.retract(request_id)
    metrics.queue_wait.observe(result.queue_seconds)

    clock = time.perf_counter()
    extra = _encode_extra(codec, request)

    def finish() -> tuple[bytes, TrustReport]:
        # One trip to the pool for the report, the mapping back and the encode (each trip costs a
        # thread wake-up and an event-loop turn on the latency of a lone request).
        trust = TrustReport()
        if enhance:
            trust = enhancement_report(
                state.quality, before, result, state.settings.structure_min_dice, prepared.working
            )
        context = EncodeContext(
            task=task.value,
            model_version=state.model_version,
            description=derivation_description(enhance, trust),
            extra=extra,
        )
        if output == "uncertainty":
            if result.uncertainty is None:
                # Only when the model workers run with FUNDUS_TRUST_SIGNALS=false and the API does not.
                raise ApiError(
                    503, "uncertainty_unavailable", "the model workers do not compute uncertainty maps"
                )
            pixels = restore_vessels(
                prepared,
                result.uncertainty,
                output_size=output_size,  # type: ignore[arg-type]
                threshold=None,
            )
        elif enhance:
            assert result.image is not None
            pixels = in_input_format(
                prepared.decoded,
                restore_enhanced(
                    prepared,
                    result.image,
                    output_size=output_size,  # type: ignore[arg-type]
                    method=state.settings.output_method,
                ),
            )
        else:
            assert result.vessels is not None
            pixels = restore_vessels(
                prepared,
                result.vessels,
                output_size=output_size,
                threshold=threshold,  # type: ignore[arg-type]
            )
        return _encode(codec, pixels, prepared.decoded, context), trust

    body, trust = await state.cpu(finish)
    if enhance:
        trust.observe(metrics)
    postprocess_s = time.perf_counter() - clock
    metrics.postprocess_duration.observe(postprocess_s)
    timing = _server_timing(
        queue=result.queue_seconds, inference=result.inference_seconds, pre=preprocess_s, post=postprocess_s
    )
    headers = {
        "Server-Timing": timing,
        "X-Batch-Size": str(result.batch_size),
        **fov_headers(prepared.view.fov),
        **trust.headers(),
    }
    if enhance:
        headers["X-Enhanced"] = "true"
    return await _deliver(state, body, codec, headers, store, report)


def _check_trust_options(state: ServiceState, only_if_needed: bool, output: str, fmt: str | None) -> None:
    """Refuse, before any work, the options this configuration cannot honour (400)."""
    if only_if_needed and state.quality is None:
        raise ApiError(
            400,
            "unsupported_option",
            "only_if_needed needs the quality grader (FUNDUS_QUALITY_WEIGHTS is empty)",
        )
    if output != "uncertainty":
        return
    if not state.settings.trust_signals:
        raise ApiError(
            400, "unsupported_option", "output=uncertainty needs trust signals (FUNDUS_TRUST_SIGNALS=false)"
        )
    if fmt is not None and fmt not in ("png", "tiff"):
        raise ApiError(400, "unsupported_format", "the uncertainty map is available as png or tiff")


async def _already_good(
    state: ServiceState,
    request: Request,
    upload: Upload,
    prepared: Prepared,
    before: QualityGrade,
    codec: Codec,
    output_size: str,
    store: bool | None,
    report: str,
) -> Response:
    """``only_if_needed`` on a photograph graded good: the input unchanged, ``X-Enhanced: false``.

    In the upload's own format and geometry the upload's bytes come back as they were sent (a DICOM
    instance keeps its UIDs); otherwise its decoded pixels are encoded in the format asked for.
    """
    state.metrics.skipped_enhancements.inc()
    state.metrics.quality_before.observe(before.probabilities["good"])
    headers = {
        "X-Enhanced": "false",
        "X-Quality-Before": before.header(),
        **fov_headers(prepared.view.fov),
    }
    if codec.media_type == prepared.decoded.media_type and output_size == "original":
        return await _deliver(state, upload.data, codec, headers, store, report)
    context = EncodeContext(
        task="enhance",
        model_version=state.model_version,
        description=f"not enhanced: quality {before.header().replace(';', ' ')}",
        extra=_encode_extra(codec, request),
    )
    pixels = prepared.working if output_size == "model" else prepared.decoded.pixels
    body = await state.cpu(
        _encode, codec, in_input_format(prepared.decoded, pixels), prepared.decoded, context
    )
    return await _deliver(state, body, codec, headers, store, report)


@router.post(
    "/enhance",
    summary="Enhance a fundus photograph",
    response_class=Response,
    responses=image_responses(
        "the enhanced image (or its uncertainty map), in the input's geometry by default",
        _IMAGE_MEDIA,
        TRUST_HEADERS,
    ),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def enhance(
    request: Request,
    format: FormatQuery = None,
    output_size: OutputSizeQuery = "original",
    store: StoreQuery = None,
    report: ReportQuery = "file",
    fov: FovQuery = "auto",
    only_if_needed: Annotated[
        bool | None,
        Query(
            description="when the photograph is already graded good, return it unchanged "
            "(`X-Enhanced: false`) instead of enhancing it; default `FUNDUS_ENHANCE_ONLY_IF_NEEDED`"
        ),
    ] = None,
    output: Annotated[
        Literal["image", "uncertainty"],
        Query(
            description="`image`: the enhanced photograph; `uncertainty`: the 8-bit per-pixel uncertainty "
            "map (disagreement of the two stages, ×4 gain) in the same geometry, PNG or TIFF"
        ),
    ] = "image",
) -> Response:
    reject_unknown_query(
        request, {"format", "output_size", "store", "report", "fov", "only_if_needed", "output"}
    )
    return await _model_request(
        request,
        Task.ENHANCE,
        format,
        output_size,
        store=store,
        report=report,
        fov=fov,
        only_if_needed=only_if_needed,
        output=output,
    )


@router.post(
    "/segment",
    summary="Vessel probability map of a fundus photograph",
    response_class=Response,
    responses=image_responses(
        "8-bit grayscale vessel probability (or 0/255 mask with threshold)", _IMAGE_MEDIA
    ),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def segment(
    request: Request,
    format: FormatQuery = None,
    output_size: OutputSizeQuery = "original",
    threshold: Annotated[
        float | None, Query(ge=0.0, le=1.0, description="binarise: pixels with probability ≥ threshold → 255")
    ] = None,
    store: StoreQuery = None,
    report: ReportQuery = "file",
    fov: FovQuery = "auto",
) -> Response:
    reject_unknown_query(request, {"format", "output_size", "threshold", "store", "report", "fov"})
    return await _model_request(
        request, Task.SEGMENT, format, output_size, threshold, store=store, report=report, fov=fov
    )


def parse_types(raw: str | None) -> list[str] | None:
    """``illumination,spot`` → list; None means every type. Unknown or empty names → 400."""
    if raw is None:
        return None
    names = [name.strip().lower() for name in raw.split(",")]
    if not names or any(not name for name in names):
        raise ApiError(400, "bad_request", "types must be a comma-separated list of illumination, spot, blur")
    unknown = sorted(set(names) - set(DEGRADATION_TYPES))
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown degradation type(s) {', '.join(unknown)}; valid: {', '.join(DEGRADATION_TYPES)}",
        )
    return list(dict.fromkeys(names))


def _params_header(params: dict[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        if hasattr(value, "item"):
            return value.item()
        return str(value)

    return json.dumps(params, default=plain, separators=(",", ":"), ensure_ascii=True)


@router.post(
    "/degrade",
    summary="Cofe-Net degradation of a fundus photograph (reproducible by seed)",
    response_class=Response,
    responses=image_responses("the degraded image; parameters in X-Degradation-Params", _IMAGE_MEDIA),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def degrade_endpoint(
    request: Request,
    seed: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="random seed; drawn when absent")
    ] = None,
    types: Annotated[
        str | None, Query(description="comma-separated subset of illumination,spot,blur")
    ] = None,
    mode: Annotated[
        Literal["cofe", "paper"], Query(description="parameter ranges: Cofe-Net or the paper")
    ] = "cofe",
    format: FormatQuery = None,
    store: DegradeStoreQuery = None,
    report: ReportQuery = "file",
    fov: FovQuery = "auto",
) -> Response:
    reject_unknown_query(request, {"seed", "types", "mode", "format", "store", "report", "fov"})
    # A degraded copy reaches a PACS only when asked for explicitly, never by default.
    store = bool(store)
    state = get_state(request)
    _check_store(state, store, report)
    chosen_types = parse_types(types)
    used_seed = seed if seed is not None else secrets.randbelow(2**31)
    upload = await read_upload(request, state.settings.max_upload_bytes, body_limits(state))
    clock = time.perf_counter()

    deadline = _deadline(request, state)
    settings = state.settings

    def work() -> tuple[DecodedImage, np.ndarray, dict[str, Any], FovEstimate | None]:
        # The degradation runs at the photograph's own resolution: its own, smaller pixel limit, checked
        # from the header before decoding, keeps one job's memory bounded.
        limit = min(settings.max_pixels, settings.max_degrade_pixels)
        decoded = decode_upload(state.codecs, upload, max_pixels=limit, min_side=settings.min_image_side)
        if time.time() > deadline:
            raise DeadlineExceeded("request deadline passed before the degradation started")
        pixels, params, estimate = degrade(decoded, seed=used_seed, types=chosen_types, mode=mode, fov=fov)
        return decoded, in_input_format(decoded, pixels), params, estimate

    # At most FUNDUS_MAX_DEGRADE_JOBS degradations at a time, waiting no longer than the deadline.
    slots = state.degrade_slots()
    try:
        await asyncio.wait_for(slots.acquire(), timeout=max(deadline - time.time(), 0.001))
    except TimeoutError:
        raise DeadlineExceeded("request deadline passed while waiting for a degradation slot") from None
    try:
        decoded, pixels, params, estimate = await state.cpu(work)
    finally:
        slots.release()
    codec = choose_output_codec(
        state.codecs, format, request.headers.get("accept"), _default_format(state.codecs, decoded)
    )
    params = {**params, "seed": used_seed, "mode": mode, "types": chosen_types or list(DEGRADATION_TYPES)}
    context = EncodeContext(
        task="degrade",
        model_version=state.model_version,
        description="Cofe-Net degradation",
        extra={**params, **_encode_extra(codec, request)},
    )
    body = await state.cpu(_encode, codec, pixels, decoded, context)
    if time.time() > deadline:
        raise DeadlineExceeded("request deadline passed during the degradation")
    headers = {
        "X-Degradation-Params": _params_header(params),
        "Server-Timing": _server_timing(degrade=time.perf_counter() - clock),
        **fov_headers(estimate),
    }
    return await _deliver(state, body, codec, headers, store, report)


@router.post(
    "/render",
    summary="The upload as the service decodes it, as PNG (for viewers that cannot show TIFF or DICOM)",
    response_class=Response,
    responses=image_responses("the decoded image as PNG, same size; nothing is kept", ("image/png",)),
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def render(request: Request) -> Response:
    reject_unknown_query(request, set())
    state = get_state(request)
    upload = await read_upload(request, state.settings.max_upload_bytes, body_limits(state))
    codec = state.codecs.by_format("png")
    assert codec is not None

    def work() -> bytes:
        decoded = decode_upload(
            state.codecs, upload, max_pixels=state.settings.max_pixels, min_side=state.settings.min_image_side
        )
        context = EncodeContext(task="render", model_version=state.model_version)
        return _encode(codec, decoded.pixels, None, context)

    body = await state.cpu(work)
    return Response(content=body, media_type="image/png")
