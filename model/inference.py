"""One served model pass as a pure tensor function: uint8 batch in, uint8 answers and trust figures out.

Everything between the host's uint8 pixels and the host's uint8 answers happens on the model's
device with fixed shapes and no host synchronisation: the division to [0, 1], the network, the
rounding back to uint8, the uncertainty map and the vessel counts of the structure comparison. That
keeps host↔device traffic to uint8 (a quarter of float32) and makes the whole pass capturable in
a CUDA graph (:mod:`model.cuda_graphs`); on the CPU it is simply called.

Modes:
* ``image``: the enhanced image and the input's vessel probability (both from one forward pass);
  with ``trust``, also the stage-disagreement uncertainty map, its mean inside the FOV, and the
  vessel pixel counts of input vs output (one more pass of the vessel branch over the output).
* ``vessels``: only the vessel branch over the input (``/segment`` batches).

With a quality grader, ``image`` mode also grades the input and the rounded output (P(good) each),
so the API process does not have to.
"""

from __future__ import annotations

from typing import Literal

import torch

from model.device import autocast
from model.magenet import MageNet
from model.quality import QualityModel
from model.trust import field_of_view, fov_means, stage_disagreement, uncertainty_map, vessel_counts

Mode = Literal["image", "vessels"]
MODES: tuple[Mode, ...] = ("image", "vessels")


def to_uint8(values: torch.Tensor) -> torch.Tensor:
    """[0, 1] float tensor → rounded uint8 on the same device and in the same layout."""
    return values.float().clamp(0.0, 1.0).mul(255.0).add(0.5).to(torch.uint8)


def served_pass(
    model: MageNet,
    pixels: torch.Tensor,
    *,
    mode: Mode,
    trust: bool,
    memory_format: torch.memory_format = torch.contiguous_format,
    grader: QualityModel | None = None,
) -> dict[str, torch.Tensor]:
    """One pass over uint8 (B, 3, S, S) ``pixels`` on the model's device (call under inference mode).

    Returns device tensors: ``vessels`` uint8 (B, S, S) always; for ``image`` mode ``image`` uint8
    (B, 3, S, S); with ``trust`` ``uncertainty`` uint8 (B, S, S), ``uncertainty_mean`` float32
    (B,) and ``vessel_counts`` int64 (B, 3) (see :func:`model.trust.vessel_counts`); with a
    ``grader`` (on the same device) ``quality_before`` and ``quality_after``, P(good) float32 (B,).
    """
    x = pixels.float().div(255.0).contiguous(memory_format=memory_format)
    device = x.device
    if mode == "vessels":
        with autocast(device):
            probability = model.vessels.predict(x)
        return {"vessels": to_uint8(probability[:, 0])}
    with autocast(device):
        output = model(x)
        image = output.images[0].clamp(0.0, 1.0)
        vessels_out = model.vessels.predict(image)[:, 0].float() if trust else None
    vessels_in = torch.softmax(output.vessel_logits[-1].float(), dim=1)[:, 1]
    result = {"image": to_uint8(image), "vessels": to_uint8(vessels_in)}
    if grader is not None:
        result["quality_before"] = grader.tensor_probabilities(x)
        result["quality_after"] = grader.tensor_probabilities(result["image"].float().div(255.0))
    if vessels_out is not None:
        disagreement = stage_disagreement(output.images[0], output.images[1])
        fov = field_of_view(x)
        result["uncertainty"] = uncertainty_map(disagreement)
        result["uncertainty_mean"] = fov_means(disagreement, fov)
        result["vessel_counts"] = vessel_counts(vessels_in, vessels_out, fov)
    return result
