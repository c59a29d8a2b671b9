"""The way a photograph goes to the model and back, shared by the service and the evaluation.

:func:`working_view` finds the field of view and cuts the square working-size model input;
:func:`enhanced_to_input` and :func:`vessels_to_input` put working-size answers back into the
photograph's own geometry. ``fundus eval`` measures restorations through these same functions, so
a native-resolution figure there is what ``POST /enhance`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.fov import SquareCrop, from_working, plan_crop, to_working
from model.fov_detect import FovEstimate, estimate_fov

MappingMethod = Literal["transfer", "resize"]
FovMode = Literal["auto", "full"]
#: Vessel maps are blended in from this share of the FOV radius inside the rim: the model answers
#: the step at the rim of the zero-padded working image with a false vessel there.
VESSEL_RIM_MARGIN = 0.015


@dataclass(frozen=True)
class WorkingView:
    """A photograph's model input and the crop that maps answers back.

    Attributes:
        crop: the square FOV crop (original coordinates) and the working size.
        working: (S, S, 3) uint8 model input, zero outside the FOV.
        fov: how the field of view was found (``fitted`` / ``fallback`` / ``full``, confidence,
            the photographed area).
    """

    crop: SquareCrop
    working: np.ndarray
    fov: FovEstimate

    def model_input(self) -> np.ndarray:
        """(3, S, S) uint8, the layout the model and the queue take."""
        return np.ascontiguousarray(self.working.transpose(2, 0, 1))


def working_view(pixels: np.ndarray, working_size: int, fov: FovMode = "auto") -> WorkingView:
    """Find the FOV of (H, W, 3) uint8 ``pixels`` and cut the (S, S, 3) working image.

    Args:
        pixels: the photograph.
        working_size: S.
        fov: ``auto`` detects the field of view; ``full`` takes the whole frame.

    Raises:
        model.fov_detect.NotFundus: the image is clearly not a fundus photograph.
        model.fov.FovNotFound: the image is too small to analyse.
    """
    estimate = estimate_fov(pixels, fov)
    crop = plan_crop(estimate.circle, pixels.shape[0], pixels.shape[1], working_size)
    working = np.ascontiguousarray(to_working(pixels, crop), dtype=np.uint8)
    return WorkingView(crop=crop, working=working, fov=estimate)


def enhanced_to_input(
    view: WorkingView, pixels: np.ndarray, result: np.ndarray, method: MappingMethod = "transfer"
) -> np.ndarray:
    """(S, S, 3) uint8 enhanced working image → (H, W, 3) uint8 in the geometry of ``pixels``.

    Outside the photographed field of view the answer is ``pixels`` itself.
    """
    return from_working(result, view.crop, pixels, working_input=view.working, method=method, area=view.fov)


def vessels_to_input(view: WorkingView, pixels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """(S, S) uint8 vessel probability → (H, W) uint8, zero outside the FOV and on its rim."""
    margin = VESSEL_RIM_MARGIN * view.crop.circle.radius if view.fov.method == "fitted" else 0.0
    return from_working(probability, view.crop, pixels, method="resize", area=view.fov, rim_margin=margin)
