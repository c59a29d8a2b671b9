"""The quality grader as loaded for serving: batch norm folded into the convolutions and channels-last
weights give the trained network's answers; the 512 → 256 average pool equals area resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.quality import QUALITY_SIZE, QualityNet, for_inference, load_quality, save_quality


def _trained_looking_net() -> QualityNet:
    """A grader whose batch-norm layers hold non-trivial statistics and affine terms."""
    torch.manual_seed(0)
    net = QualityNet(width=8)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_folded_grader_answers_like_the_trained_network() -> None:
    net = _trained_looking_net()
    folded = for_inference(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.rand(3, 3, QUALITY_SIZE, QUALITY_SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)


def test_loaded_grader_grades_as_before_on_both_paths(tmp_path: Path) -> None:
    net = _trained_looking_net()
    path = tmp_path / "grader.safetensors"
    save_quality(path, net, 1.7, {"note": "test"})
    grader = load_quality(path)
    images = torch.rand(2, 3, 2 * QUALITY_SIZE, 2 * QUALITY_SIZE)
    with torch.inference_mode():
        expected = torch.sigmoid(net(F.interpolate(images, size=(QUALITY_SIZE,) * 2, mode="area")) / 1.7)
        torch.testing.assert_close(grader.tensor_probabilities(images), expected, atol=1e-5, rtol=0)
        odd = torch.rand(1, 3, 300, 300)
        expected_odd = torch.sigmoid(net(F.interpolate(odd, size=(QUALITY_SIZE,) * 2, mode="area")) / 1.7)
        torch.testing.assert_close(grader.tensor_probabilities(odd), expected_odd, atol=1e-5, rtol=0)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    uint8_path = grader.probabilities(pixels)
    np.testing.assert_allclose(uint8_path, expected.numpy(), atol=0.02)  # uint8 rounding only
