"""Answers in the input's own format: gray in → gray out, 16 bits in → 16 bits out.

The model works on 8-bit RGB. An answer image (enhanced or degraded) is brought back to the input's
layout: gray inputs get the luminance of the answer; inputs stored with 16 bits per sample get the
answer's change, measured in 8-bit steps and scaled to 16 bits, added to their own samples. Pixels the
model left alone (outside the field of view) keep the input's exact 16-bit values, and nothing of the
input's precision is lost elsewhere but what the model changed.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.codecs import DecodedImage

#: One 8-bit step in 16-bit units.
STEP_16 = 257


def in_input_format(decoded: DecodedImage, answer: np.ndarray) -> np.ndarray:
    """``answer`` (uint8 [H, W, 3] RGB, or any other size for ``output_size=model``) in the layout
    and depth of ``decoded``: uint8/uint16, [H, W] for gray inputs, [H, W, 3] otherwise."""
    image = np.ascontiguousarray(answer, dtype=np.uint8)
    base = decoded.pixels
    if decoded.gray and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        base = base[:, :, 0]
    wide = decoded.samples16
    if wide is None or image.shape != wide.shape or base.shape != image.shape:
        return image
    change = image.astype(np.int32) - base.astype(np.int32)
    lifted = np.clip(wide.astype(np.int32) + change * STEP_16, 0, 65535).astype(np.uint16)
    return np.where(change == 0, wide, lifted)
