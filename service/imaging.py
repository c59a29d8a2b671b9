"""CPU-side image work of the API process: decode, FOV crop to the working size, and the way back.

Everything here is synchronous and CPU-bound; the routes run it in the app's thread pool so the event
loop stays free. Errors for client data are raised as :class:`~service.errors.ApiError` with the
status the design assigns (413 too large, 415 unsupported/undecodable, 422 not a usable fundus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from model.fov import FovNotFound, SquareCrop
from model.fov_detect import FovEstimate, estimate_fov
from model.restore import (
    FovMode,
    MappingMethod,
    WorkingView,
    enhanced_to_input,
    vessels_to_input,
    working_view,
)
from service.codecs import CodecRegistry, DecodedImage, ImageTooLarge, UndecodableImage
from service.errors import ApiError
from service.upload import Upload

OutputSize = Literal["original", "model"]
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream"}


@dataclass
class Prepared:
    """An upload ready for the model.

    Attributes:
        decoded: the decoded upload (pixels [H, W, 3] uint8 RGB).
        view: the FOV crop and the uint8 [S, S, 3] model input.
    """

    decoded: DecodedImage
    view: WorkingView

    @property
    def crop(self) -> SquareCrop:
        return self.view.crop

    @property
    def working(self) -> np.ndarray:
        return self.view.working

    def model_input(self) -> np.ndarray:
        """uint8 [3, S, S], the layout a queue job carries."""
        return self.view.model_input()


def decode_upload(registry: CodecRegistry, upload: Upload, *, max_pixels: int, min_side: int) -> DecodedImage:
    """Pick the codec from the declared type (checked against the magic bytes) and decode."""
    sniffed = registry.sniff(upload.data[:512])
    declared = (upload.declared_type or "").split(";", 1)[0].strip().lower()
    supported = ", ".join(registry.decodable_types())
    if declared in _GENERIC_TYPES:
        if sniffed is None:
            raise ApiError(
                415, "unsupported_media_type", f"unrecognised image format; send one of {supported}"
            )
        codec = sniffed
    else:
        codec = registry.by_media_type(declared)
        if codec is None or not codec.can_decode:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {declared!r} is not supported; send one of {supported}",
            )
        if sniffed is not codec:
            found = f"looks like {sniffed.media_type}" if sniffed else "is not a recognised image"
            raise ApiError(415, "content_mismatch", f"declared {codec.media_type} but the data {found}")
    try:
        decoded = codec.decode(upload.data, max_pixels=max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except UndecodableImage as exc:
        raise ApiError(415, "undecodable", str(exc)) from None
    if min(decoded.width, decoded.height) < min_side:
        raise ApiError(
            422,
            "image_too_small",
            f"image is {decoded.width}×{decoded.height}; both sides must be at least {min_side} pixels",
        )
    return decoded


def prepare(decoded: DecodedImage, working_size: int, fov: FovMode = "auto") -> Prepared:
    """Find the field of view (or take the whole frame for ``fov=full``) and cut the working crop.

    Only an image that is clearly not a fundus photograph is refused (422 ``no_fundus``); an
    uncertain field of view falls back to the bright region or the whole frame.
    """
    try:
        view = working_view(decoded.pixels, working_size, fov)
    except FovNotFound as exc:
        raise ApiError(422, "no_fundus", f"not usable as a fundus photograph: {exc}") from None
    return Prepared(decoded=decoded, view=view)


def fov_headers(estimate: FovEstimate | None) -> dict[str, str]:
    """``X-FOV`` (fitted | fallback | full | none) and ``X-FOV-Confidence`` for a response."""
    if estimate is None:
        return {"X-FOV": "none"}
    return {"X-FOV": estimate.method, "X-FOV-Confidence": f"{estimate.confidence:.2f}"}


def planes_to_pixels(planes: np.ndarray) -> np.ndarray:
    """uint8 [C, S, S] (the queue layout) → C-contiguous [S, S, C].

    ``cv2.merge`` interleaves the planes about twenty times faster than a transposed copy.
    """
    planes = np.asarray(planes, dtype=np.uint8)
    if planes.ndim != 3 or not 1 <= planes.shape[0] <= 4:
        return np.ascontiguousarray(planes.transpose(1, 2, 0))
    merged = cv2.merge([np.ascontiguousarray(plane) for plane in planes])
    return merged.reshape(planes.shape[1], planes.shape[2], planes.shape[0])


def restore_enhanced(
    prepared: Prepared, result: np.ndarray, *, output_size: OutputSize, method: MappingMethod
) -> np.ndarray:
    """Enhanced uint8 [3, S, S] → [H, W, 3] in the input's geometry, or [S, S, 3] for ``model``."""
    image = planes_to_pixels(result)
    if output_size == "model":
        return image
    return enhanced_to_input(prepared.view, prepared.decoded.pixels, image, method)


def restore_vessels(
    prepared: Prepared, vessels: np.ndarray, *, output_size: OutputSize, threshold: float | None
) -> np.ndarray:
    """Vessel probability uint8 [S, S] → [H, W] (zero outside the crop), optionally binarised to 0/255."""
    prob = np.ascontiguousarray(vessels, dtype=np.uint8)
    if output_size == "original":
        prob = vessels_to_input(prepared.view, prepared.decoded.pixels, prob)
    if threshold is not None:
        prob = np.where(prob.astype(np.float32) >= threshold * 255.0, 255, 0).astype(np.uint8)
    return prob


def degrade(
    decoded: DecodedImage, *, seed: int, types: list[str] | None, mode: str, fov: FovMode = "auto"
) -> tuple[np.ndarray, dict[str, Any], FovEstimate | None]:
    """Cofe-Net degradation of the whole image at its own resolution.

    The degradation is confined to the field of view (the same estimate the model endpoints use);
    an image without one is degraded over the whole frame. Returns (uint8 [H, W, 3], parameters,
    the FOV estimate or None).
    """
    import torch

    from model.degradation import degrade_image

    tensor = torch.from_numpy(np.ascontiguousarray(decoded.pixels.transpose(2, 0, 1))).float().div_(255.0)
    try:
        estimate: FovEstimate | None = estimate_fov(decoded.pixels, fov)
    except FovNotFound:
        estimate = None
    mask = None
    if estimate is not None and estimate.method != "full":
        mask = torch.from_numpy(estimate.mask())[None]
    try:
        degraded, params = degrade_image(tensor, mask, seed, types=types, mode=mode)
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"invalid degradation request: {exc}") from None
    out = (degraded.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    if mask is not None:
        # The degradation comes out multiplied by the mask; the input stays outside the field of view
        # and is added back in proportion on its soft rim, so only the fundus is degraded.
        weight = mask[0].numpy()
        outside = weight <= 0.0
        out[outside] = decoded.pixels[outside]
        rim = (weight > 0.0) & (weight < 1.0)
        kept = decoded.pixels[rim].astype(np.float32) * (1.0 - weight[rim])[:, None] + out[rim]
        out[rim] = np.clip(kept + 0.5, 0, 255).astype(np.uint8)
    return out, params, estimate
