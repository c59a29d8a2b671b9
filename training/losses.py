"""Losses of T-MAGE-Net (MODEL_SPEC §1.4, §2.4).

- Charbonnier: mean √((ŷ − y)² + ε²).
- Edge: Charbonnier between Laplacian-pyramid bands lap(x) = x − G(U(D(G(x)))) of prediction and
  target, with the 5×5 binomial kernel G kept as a buffer (moves with ``.to(device)``).
- Segmentation: 2-class cross-entropy of each vessel output against a {0,1} mask.
- Consistency: MSE between student and (detached) teacher outputs; vessel logits are compared as
  softmax probabilities, as the mean teacher does for class logits.

Terms are always added with Python ``sum`` over tensors (never ``torch.tensor`` of a list, which
would silently cut the graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean Charbonnier distance over all elements; pred/target [B, C, H, W]."""
    diff = pred.float() - target.float()
    return torch.sqrt(diff * diff + eps * eps).mean()


class EdgeLoss(nn.Module):
    """Charbonnier between Laplacian bands of prediction and target (MPRNet's edge loss).

    Works for any channel count: the 5×5 kernel is applied depthwise.
    """

    kernel: torch.Tensor

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        taps = torch.tensor([0.05, 0.25, 0.4, 0.25, 0.05])
        self.register_buffer("kernel", torch.outer(taps, taps)[None, None], persistent=False)
        self.eps = eps

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(channels, 1, 5, 5)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), weight, groups=channels)

    def laplacian(self, x: torch.Tensor) -> torch.Tensor:
        """Band-pass x − G(U(D(G(x)))): D keeps every 2nd pixel, U re-inserts zeros ×4. [B,C,H,W]."""
        blurred = self._blur(x)
        up = torch.zeros_like(blurred)
        up[:, :, ::2, ::2] = blurred[:, :, ::2, ::2] * 4.0
        return x - self._blur(up)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return charbonnier(self.laplacian(pred.float()), self.laplacian(target.float()), self.eps)


def segmentation_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """2-class cross-entropy. logits [B, 2, H, W]; mask [B, 1, H, W] or [B, H, W] in {0, 1}."""
    target = mask.reshape(mask.shape[0], *mask.shape[-2:]).round().long()
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in size")
    return F.cross_entropy(logits.float(), target)


def segmentation_ce_weighted(logits: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean CE, averaged with per-sample ``weights`` (B,) (0 = sample has no mask)."""
    target = mask.reshape(mask.shape[0], *mask.shape[-2:]).round().long()
    per_sample = F.cross_entropy(logits.float(), target, reduction="none").mean(dim=(1, 2))
    w = weights.float().to(per_sample.device)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)


def multiscale_segmentation(
    vessel_logits: Sequence[torch.Tensor],
    mask: torch.Tensor,
    include_avg: bool,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of per-scale CE. ``vessel_logits`` = [avg, side_H/8, side_H/4, side_H/2, side_H].

    ``weights`` (B,) masks out samples without a vessel target (None = all samples count).
    """
    outputs = list(vessel_logits) if include_avg else list(vessel_logits[1:])
    if weights is None:
        terms = [segmentation_ce(o, mask) for o in outputs]
    else:
        terms = [segmentation_ce_weighted(o, mask, weights) for o in outputs]
    return sum(terms[1:], terms[0])


def consistency_mse(
    student_images: Sequence[torch.Tensor],
    teacher_images: Sequence[torch.Tensor],
    student_vessels: Sequence[torch.Tensor] = (),
    teacher_vessels: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Σ_k MSE(S_k, T_k) over images + Σ_s MSE(softmax S_s, softmax T_s) over vessel scales.

    Teacher tensors are detached here, so a caller cannot leak gradients into the teacher.
    """
    if len(student_images) != len(teacher_images) or len(student_vessels) != len(teacher_vessels):
        raise ValueError("student and teacher output lists differ in length")
    terms = [
        F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_images, teacher_images, strict=True)
    ]
    terms += [
        F.mse_loss(torch.softmax(s.float(), dim=1), torch.softmax(t.detach().float(), dim=1))
        for s, t in zip(student_vessels, teacher_vessels, strict=True)
    ]
    if not terms:
        raise ValueError("consistency needs at least one output pair")
    return sum(terms[1:], terms[0])


class RestorationLoss(nn.Module):
    """L_e = Σ_k [Char(I_k, y) + w_e · Edge(I_k, y)] over the selected stages.

    ``images`` follows the model output order ``[final (stage 2), stage 1]``; ``stages`` names
    which of them are supervised (1 = stage-1 image, 2 = final image).
    """

    def __init__(self, eps: float = 1e-3, edge_weight: float = 0.05, stages: Sequence[int] = (1, 2)) -> None:
        super().__init__()
        self.eps = eps
        self.edge_weight = edge_weight
        self.stages = tuple(stages)
        self.edge = EdgeLoss(eps)

    def forward(self, images: Sequence[torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        picked = [images[0] if stage == 2 else images[1] for stage in self.stages]
        char_terms = [charbonnier(img, target, self.eps) for img in picked]
        edge_terms = [self.edge(img, target) for img in picked]
        char = sum(char_terms[1:], char_terms[0])
        edge = sum(edge_terms[1:], edge_terms[0])
        return {"char": char, "edge": edge, "restore": char + self.edge_weight * edge}
