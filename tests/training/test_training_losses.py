"""Loss values on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    EdgeLoss,
    RestorationLoss,
    charbonnier,
    consistency_mse,
    multiscale_segmentation,
    segmentation_ce,
)


def test_charbonnier_known_values() -> None:
    x = torch.zeros(1, 3, 4, 4)
    assert charbonnier(x, x, eps=1e-3).item() == pytest.approx(1e-3, rel=1e-5)
    assert charbonnier(x + 1.0, x, eps=1e-3).item() == pytest.approx(math.sqrt(1 + 1e-6), rel=1e-6)
    half = torch.cat([torch.zeros(1, 3, 2, 4), torch.full((1, 3, 2, 4), 0.5)], dim=2)
    expected = 0.5 * 1e-3 + 0.5 * math.sqrt(0.25 + 1e-6)
    assert charbonnier(half, x).item() == pytest.approx(expected, rel=1e-5)


def test_edge_loss_sees_edges_not_offsets() -> None:
    edge = EdgeLoss(eps=1e-3)
    smooth = torch.rand(1, 3, 16, 16)
    assert edge(smooth, smooth).item() == pytest.approx(1e-3, rel=1e-4)
    # The Laplacian band of a constant image vanishes away from the border.
    band = edge.laplacian(torch.full((1, 3, 16, 16), 0.7))
    assert band[..., 4:-4, 4:-4].abs().max().item() < 1e-6
    noisy = smooth + 0.2 * torch.randn_like(smooth)
    assert edge(noisy, smooth).item() > 0.05
    assert edge.kernel.shape == (1, 1, 5, 5)


def test_segmentation_ce_of_uniform_logits_is_log2() -> None:
    logits = torch.zeros(2, 2, 8, 8)
    mask = torch.randint(0, 2, (2, 1, 8, 8)).float()
    assert segmentation_ce(logits, mask).item() == pytest.approx(math.log(2), rel=1e-6)
    outputs = [logits] * 5
    assert multiscale_segmentation(outputs, mask, include_avg=False).item() == pytest.approx(4 * math.log(2))
    assert multiscale_segmentation(outputs, mask, include_avg=True).item() == pytest.approx(5 * math.log(2))


def test_segmentation_weights_exclude_samples_without_masks() -> None:
    good = torch.zeros(1, 2, 4, 4)
    good[:, 1] = 10.0  # confident "vessel"
    logits = torch.cat([good, good])
    mask = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])  # the second sample would be very wrong
    weights = torch.tensor([1.0, 0.0])
    loss = multiscale_segmentation([logits] * 5, mask, include_avg=False, weights=weights)
    assert loss.item() < 1e-3
    assert multiscale_segmentation([logits] * 5, mask, include_avg=False).item() > 10


def test_consistency_mse_values_and_detached_teacher() -> None:
    s_img = torch.zeros(1, 3, 4, 4, requires_grad=True)
    t_img = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    s_seg = torch.zeros(1, 2, 4, 4)
    t_seg = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 4, 4)  # softmax = (1/4, 3/4)
    loss = consistency_mse([s_img], [t_img], [s_seg], [t_seg])
    assert loss.item() == pytest.approx(0.25 + 0.0625, rel=1e-5)
    loss.backward()
    assert s_img.grad is not None and t_img.grad is None
    with pytest.raises(ValueError):
        consistency_mse([s_img], [])


def test_restoration_loss_stage_selection_keeps_the_graph() -> None:
    target = torch.zeros(1, 3, 8, 8)
    final = torch.full((1, 3, 8, 8), 1.0, requires_grad=True)
    stage1 = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    both = RestorationLoss(stages=(1, 2))([final, stage1], target)
    only1 = RestorationLoss(stages=(1,))([final, stage1], target)
    assert both["char"].item() == pytest.approx(math.sqrt(1 + 1e-6) + math.sqrt(0.25 + 1e-6), rel=1e-5)
    assert only1["char"].item() == pytest.approx(math.sqrt(0.25 + 1e-6), rel=1e-5)
    both["restore"].backward()
    assert final.grad is not None and stage1.grad is not None
