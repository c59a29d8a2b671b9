"""Synthetic training inputs: Cofe-Net degradation of clean working images, some left clean.

Both phases use it: the vessel branch (phase 1) learns to read vessels through the degradations it
will have to guide the restorer on, and the restorer (phase 2) also sees clean inputs whose target
is the input itself, so it learns to leave a good photograph alone instead of applying the average
correction of the degraded ones.
"""

from __future__ import annotations

import torch

from model.degradation import degrade


def degrade_some(
    clean: torch.Tensor,
    fov: torch.Tensor,
    generator: torch.Generator,
    *,
    keep_prob: float,
    mode: str = "cofe",
) -> torch.Tensor:
    """Degrade each image of a batch, except a random share ``keep_prob`` that stays clean.

    Args:
        clean: (B, 3, H, W) float images on [0, 1], any device.
        fov: (B, 1, H, W) FOV masks in {0, 1}.
        generator: CPU generator; the degradation parameters and the keep draws come from it, so the
            result is reproducible from its state (which training checkpoints).
        keep_prob: probability that an image is returned undegraded (0 = degrade all, 1 = none).
        mode: Cofe ``cofe`` or ``paper`` constants.

    Returns:
        (B, 3, H, W) inputs in the dtype of ``clean``.
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    keep = torch.rand(clean.shape[0], generator=generator) < keep_prob
    if bool(keep.all()):
        return clean
    degraded, _ = degrade(clean, fov, generator=generator, mode=mode)
    degraded = degraded.to(device=clean.device, dtype=clean.dtype)
    if not bool(keep.any()):
        return degraded
    return torch.where(keep.to(clean.device)[:, None, None, None], clean, degraded)
