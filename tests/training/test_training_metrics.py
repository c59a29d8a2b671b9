"""PSNR/SSIM in the FOV and vessel AUC/accuracy/IoU."""

from __future__ import annotations

import math

import pytest
import torch

from training.metrics import psnr, roc_auc, ssim, vessel_metrics


def test_psnr_known_value_and_fov_restriction() -> None:
    clean = torch.full((3, 8, 8), 0.5)
    noisy = clean.clone()
    noisy[:, :4] += 0.1  # top half off by 0.1
    fov = torch.zeros(8, 8)
    fov[4:] = 1
    assert psnr(noisy, clean, fov) == 100.0  # the error is outside the FOV
    assert psnr(noisy, clean) == pytest.approx(10 * math.log10(1 / (0.01 / 2)), rel=1e-4)


def test_ssim_bounds() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 32, 32)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(torch.rand(3, 32, 32), x) < 0.2


def test_auc_perfect_inverted_and_ties() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(torch.full((4,), 0.5), labels) == 0.5
    assert roc_auc(torch.tensor([0.1, 0.6, 0.4, 0.9]), labels) == 0.75
    assert math.isnan(roc_auc(torch.rand(4), torch.zeros(4)))


def test_vessel_metrics_threshold() -> None:
    mask = torch.zeros(4, 4)
    mask[0] = 1
    prob = mask * 0.9 + 0.05
    prob[1, 0] = 0.7  # one false positive
    result = vessel_metrics(prob, mask)
    assert result["auc"] == 1.0
    assert result["acc"] == pytest.approx(15 / 16)
    assert result["iou"] == pytest.approx(4 / 5)
