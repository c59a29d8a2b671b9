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

from model.fov import SquareCrop, detect_fov, from_working, plan_crop, to_working

MappingMethod = Literal["transfer", "resize"]


@dataclass(frozen=True)
class WorkingView:
    """A photograph's model input and the crop that maps answers back.

    Attributes:
        crop: the square FOV crop (original coordinates) and the working size.
        working: (S, S, 3) uint8 model input, zero outside the FOV.
    """

    crop: SquareCrop
    working: np.ndarray

    def model_input(self) -> np.ndarray:
        """(3, S, S) uint8, the layout the model and the queue take."""
        return np.ascontiguousarray(self.working.transpose(2, 0, 1))


def working_view(pixels: np.ndarray, working_size: int) -> WorkingView:
    """Detect the FOV of (H, W, 3) uint8 ``pixels`` and cut the (S, S, 3) working image.

    Raises:
        model.fov.FovNotFound: no fundus field of view in the image.
    """
    circle = detect_fov(pixels)
    crop = plan_crop(circle, pixels.shape[0], pixels.shape[1], working_size)
    working = np.ascontiguousarray(to_working(pixels, crop), dtype=np.uint8)
    return WorkingView(crop=crop, working=working)


def enhanced_to_input(
    view: WorkingView, pixels: np.ndarray, result: np.ndarray, method: MappingMethod = "transfer"
) -> np.ndarray:
    """(S, S, 3) uint8 enhanced working image → (H, W, 3) uint8 in the geometry of ``pixels``."""
    return from_working(result, view.crop, pixels, working_input=view.working, method=method)


def vessels_to_input(view: WorkingView, pixels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """(S, S) uint8 vessel probability → (H, W) uint8, zero outside the FOV."""
    return from_working(probability, view.crop, pixels, method="resize")
