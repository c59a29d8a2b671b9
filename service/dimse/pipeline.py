"""The HTTP path's image steps, applied to an instance received over DIMSE.

``POST /enhance`` with a DICOM body (``service.routes.images._model_request``) runs, in order:
:func:`service.imaging.decode_upload` → :func:`service.imaging.prepare` (``fov=auto``) → one queue
:class:`Job` (the model process grades input and output inside its pass) →
:func:`service.trust.enhancement_report` (given the working image, for results that carry no grades) →
:func:`service.fidelity.in_input_format` of :func:`service.imaging.restore_enhanced` (``output_size=
original``, ``FUNDUS_OUTPUT_METHOD``) → the DICOM codec's ``encode`` with an :class:`EncodeContext`
whose description is ``T-MAGE-Net enhancement; <trust summary>`` and the default transfer syntax.
``POST /segment?format=dicom`` does the same with :func:`service.imaging.restore_vessels` (no
threshold) and ``T-MAGE-Net vessel probability``. The functions here call exactly those, with those
arguments, so a derived instance made by the node has the pixels and the Derivation Description that
``/enhance`` gives for the same file; only the HTTP plumbing (upload reading, headers) and the
``only_if_needed`` short cut (the node always enhances) are left out.

Errors: client-data problems surface as :class:`service.errors.ApiError` (413/415/422: the node
quarantines the instance); queue problems as :class:`service.queue.base.QueueError` (retried).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.quality import QualityModel
from service.codecs import Codec, CodecRegistry, EncodeContext
from service.fidelity import in_input_format
from service.imaging import Prepared, decode_upload, prepare, restore_enhanced, restore_vessels
from service.queue.base import Job, JobResult, Task
from service.settings import Settings
from service.trust import TrustReport, derivation_description, enhancement_report
from service.upload import Upload

DICOM_MEDIA_TYPE = "application/dicom"


@dataclass(frozen=True)
class ImageContext:
    """What the image steps need from the running service (the node's counterpart of ``ServiceState``).

    Attributes:
        settings: limits (``max_pixels``, ``min_image_side``), output method, structure threshold.
        codecs: the service's codec registry (its ``application/dicom`` codec writes the results).
        working_size: S of the model's [3, S, S] input, from the weight artifact.
        model_version: served weights version recorded in every derived instance.
        quality: the node's own grader (for results that carry no grades), or None when
            ``FUNDUS_QUALITY_WEIGHTS`` is empty.
    """

    settings: Settings
    codecs: CodecRegistry
    working_size: int
    model_version: str
    quality: QualityModel | None

    @property
    def dicom_codec(self) -> Codec:
        codec = self.codecs.by_media_type(DICOM_MEDIA_TYPE)
        if codec is None or not codec.can_encode:
            raise RuntimeError("the DICOM codec is not available (pydicom and highdicom are required)")
        return codec


def prepare_instance(context: ImageContext, data: bytes) -> Prepared:
    """Decode a Part-10 instance and crop its field of view (CPU work; run it in a pool).

    Raises:
        ApiError: 413 too many pixels, 415 undecodable, 422 not usable (e.g. ``no_fundus``,
            ``dicom_multiframe``, ``dicom_not_photograph``).
    """
    settings = context.settings
    decoded = decode_upload(
        context.codecs,
        Upload(data=data, declared_type=DICOM_MEDIA_TYPE),
        max_pixels=settings.max_pixels,
        min_side=settings.min_image_side,
    )
    return prepare(decoded, context.working_size, "auto")


def model_job(request_id: str, task: Task, prepared: Prepared, deadline: float) -> Job:
    """The queue job for one task of an instance (the same job ``/enhance`` or ``/segment`` submits)."""
    return Job(request_id=request_id, task=task, pixels=prepared.model_input(), deadline=deadline)


def trust_report(context: ImageContext, prepared: Prepared, result: JobResult) -> TrustReport:
    """The enhancement's trust signals, as ``/enhance`` computes them: the grades from the model pass,
    or (a worker without a grader) from the node's own grader (CPU work)."""
    return enhancement_report(
        context.quality, None, result, context.settings.structure_min_dice, prepared.working
    )


def encode_enhanced(
    context: ImageContext, prepared: Prepared, result: JobResult, trust: TrustReport
) -> bytes:
    """The derived Secondary Capture of an enhancement: ``/enhance``'s DICOM answer for this input."""
    if result.image is None:
        raise RuntimeError("the model answered an enhancement job without an image")
    method = context.settings.output_method
    pixels = in_input_format(
        prepared.decoded, restore_enhanced(prepared, result.image, output_size="original", method=method)
    )
    encode_context = EncodeContext(
        task=Task.ENHANCE.value,
        model_version=context.model_version,
        description=derivation_description(True, trust),
        extra={"transfer_syntax": None},
    )
    return context.dicom_codec.encode(pixels, original=prepared.decoded, context=encode_context)


def encode_segmentation(context: ImageContext, prepared: Prepared, result: JobResult) -> bytes:
    """The DICOM Segmentation of the vessel map: ``/segment?format=dicom``'s answer for this input."""
    if result.vessels is None:
        raise RuntimeError("the model answered a segmentation job without a vessel map")
    pixels = restore_vessels(prepared, result.vessels, output_size="original", threshold=None)
    encode_context = EncodeContext(
        task=Task.SEGMENT.value,
        model_version=context.model_version,
        description=derivation_description(False, TrustReport()),
        extra={"transfer_syntax": None},
    )
    return context.dicom_codec.encode(pixels, original=prepared.decoded, context=encode_context)
