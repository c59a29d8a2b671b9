"""Image and vessel metrics restricted to the field of view.

- PSNR on [0, 1] over the FOV pixels of all channels.
- SSIM with an 11×11 Gaussian window (σ = 1.5), computed per channel, its map averaged over the
  FOV pixels.
- Vessel AUC (rank statistic, ties averaged), accuracy and IoU at a threshold, over FOV pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB → ``[3, H, W]`` float32 on [0, 1], the layout every metric here takes."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def uint8_image(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float on [0, 1] (any device) → ``[H, W, 3]`` uint8, rounded: the inverse of
    :func:`image_tensor`."""
    return (image.clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()


def _fov(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Boolean [H, W] FOV mask (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape[-2:], dtype=torch.bool, device=like.device)
    return mask.reshape(mask.shape[-2:]).to(like.device) > 0.5


def psnr(pred: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None) -> float:
    """PSNR in dB of one image pair [3, H, W] on [0, 1] inside the FOV."""
    inside = _fov(fov, pred)
    diff = (pred.float().clamp(0, 1) - target.float().clamp(0, 1))[:, inside]
    mse = float((diff * diff).mean())
    return 100.0 if mse <= 1e-12 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(coords**2) / (2 * sigma**2))
    taps = taps / taps.sum()
    return torch.outer(taps, taps).float()


def ssim(pred: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None) -> float:
    """Mean SSIM of one image pair [C, H, W] on [0, 1], the map averaged over FOV pixels."""
    x = pred.float().clamp(0, 1)[None]
    y = target.float().clamp(0, 1)[None]
    channels = x.shape[1]
    window = _gaussian_window().to(x.device).expand(channels, 1, 11, 11)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (5, 5, 5, 5), mode="reflect"), window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    inside = _fov(fov, pred)
    return float(smap[0][:, inside].mean())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of flat ``scores`` vs binary ``labels`` (Mann-Whitney, ties averaged)."""
    s = scores.flatten().double()
    y = labels.flatten() > 0.5
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)
    # Average the ranks of tied scores.
    unique, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    if unique.numel() < s.numel():
        ends = torch.cumsum(counts, 0).double()
        mean_rank = ends - (counts.double() - 1) / 2
        ranks[order] = mean_rank[inverse]
    rank_sum = float(ranks[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def vessel_metrics(
    prob: torch.Tensor, mask: torch.Tensor, fov: torch.Tensor | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """AUC, accuracy and IoU of a vessel probability map [H, W] (or [1, H, W]) vs a {0,1} mask."""
    p = prob.reshape(prob.shape[-2:]).float()
    m = mask.reshape(mask.shape[-2:]).to(p.device) > 0.5
    inside = _fov(fov, p)
    ps, ms = p[inside], m[inside]
    pred = ps >= threshold
    union = int((pred | ms).sum())
    iou = float((pred & ms).sum()) / union if union else 1.0
    return {"auc": roc_auc(ps, ms), "acc": float((pred == ms).float().mean()), "iou": iou}
