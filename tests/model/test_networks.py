"""MAGE-Net, its vessel branch, presets and FLOP counting (tiny preset, CPU, small images)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import model.flops as flops_module
from model.blocks import CAB, SAM, DownSample, FundusAttentionBlock, SkipUpSample, crop_to, pad_to_multiple
from model.config import MageNetConfig, VesselNetConfig
from model.flops import count_gflops
from model.magenet import MageNet, MageNetOutput
from model.presets import PRESETS, get_preset
from model.vessels import AttentionGuidedFilter, VesselNet

TINY_PARAMETERS = 48216
"""Pinned so that an accidental architecture change is noticed (update deliberately)."""


@pytest.fixture(scope="module")
def tiny() -> MageNet:
    torch.manual_seed(0)
    return MageNet(get_preset("tiny"))


def rand_image(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator)


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 37, 53), (2, 64, 64), (1, 64, 48), (2, 5, 7)],
    ids=["odd", "square-batch2", "aligned-rect", "smaller-than-pad"],
)
def test_magenet_output_shapes_any_size(tiny: MageNet, batch: int, height: int, width: int) -> None:
    output = tiny(rand_image(batch, 3, height, width))
    assert isinstance(output, MageNetOutput)
    assert [tuple(t.shape) for t in output.images] == [(batch, 3, height, width)] * 2
    assert [tuple(t.shape) for t in output.vessel_logits] == [(batch, 2, height, width)] * 5
    assert all(torch.isfinite(t).all() for t in [*output.images, *output.vessel_logits])


def test_vessel_output_shapes_and_average(tiny: MageNet) -> None:
    vessels = tiny.vessels
    output = vessels(rand_image(2, 3, 37, 53))
    assert [tuple(t.shape) for t in output.logits] == [(2, 2, 37, 53)] * 5
    expected = torch.stack(output.logits[1:]).mean(dim=0)
    torch.testing.assert_close(output.logits[0], expected)
    # Features live on the padded 48×64 grid: H/8, H/4, H/2, H.
    channels = vessels.feature_channels
    assert [tuple(f.shape) for f in output.features] == [
        (2, channels[0], 6, 8),
        (2, channels[1], 12, 16),
        (2, channels[2], 24, 32),
        (2, channels[3], 48, 64),
    ]


def test_every_parameter_gets_a_gradient(tiny: MageNet) -> None:
    tiny.zero_grad(set_to_none=True)
    output = tiny(rand_image(2, 3, 37, 53))
    generator = torch.Generator().manual_seed(3)
    # Random weights avoid accidental cancellations (e.g. softmax-invariant sums over classes).
    loss = sum(
        (t * torch.randn(t.shape, generator=generator)).mean()
        for t in [*output.images, *output.vessel_logits]
    )
    loss.backward()
    named = list(tiny.named_parameters())
    missing = [name for name, p in named if p.grad is None]
    broken = [name for name, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert missing == []
    assert broken == []
    # At tiny widths a channel-attention squeeze has two hidden units whose ReLU can be dead at
    # initialisation, which legitimately zeroes a few gradients; anything more means a cut graph.
    zero = [name for name, p in named if not p.grad.abs().sum() > 0]
    assert len(zero) <= 0.05 * len(named), zero
    tiny.zero_grad(set_to_none=True)


def test_infer_matches_forward_and_clamps(tiny: MageNet) -> None:
    x = rand_image(2, 3, 37, 53)
    with torch.no_grad():
        output = tiny(x)
    image, vessels = tiny.infer(x, need_image=True, need_vessels=True)
    assert image is not None and vessels is not None
    torch.testing.assert_close(image, output.images[0].clamp(0, 1))
    torch.testing.assert_close(vessels, torch.softmax(output.vessel_logits[-1], dim=1)[:, 1:2])
    assert image.min() >= 0 and image.max() <= 1
    assert tuple(vessels.shape) == (2, 1, 37, 53)

    image_only, none = tiny.infer(x)
    assert none is None
    assert image_only is not None
    torch.testing.assert_close(image_only, image)


def test_infer_vessels_only_runs_only_the_vessel_branch(tiny: MageNet) -> None:
    x = rand_image(1, 3, 37, 53)
    calls: list[str] = []
    handle = tiny.stage1.register_forward_hook(lambda *_: calls.append("stage1"))
    try:
        image, vessels = tiny.infer(x, need_image=False, need_vessels=True)
    finally:
        handle.remove()
    assert image is None and vessels is not None
    assert calls == []
    _, expected = tiny.infer(x, need_image=True, need_vessels=True)
    assert expected is not None
    torch.testing.assert_close(vessels, expected)
    assert vessels.min() >= 0 and vessels.max() <= 1


def test_infer_needs_an_output_and_valid_input(tiny: MageNet) -> None:
    with pytest.raises(ValueError, match="need_image or need_vessels"):
        tiny.infer(rand_image(1, 3, 16, 16), need_image=False, need_vessels=False)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(rand_image(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.infer(rand_image(3, 16, 16))


def test_vessel_net_alone_predicts_probabilities() -> None:
    torch.manual_seed(0)
    net = VesselNet(VesselNetConfig(width=2, norm_groups=1))
    probability = net.predict(rand_image(2, 3, 33, 47))
    assert tuple(probability.shape) == (2, 1, 33, 47)
    assert not probability.requires_grad
    assert probability.min() >= 0 and probability.max() <= 1
    logits = net(rand_image(2, 3, 33, 47)).logits
    logits[0].sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_vessel_net_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        VesselNet(VesselNetConfig(width=8, norm_groups=3))


def test_magenet_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="rsp_to_fab"):
        MageNet(dataclasses.replace(get_preset("tiny"), rsp_to_fab=(0, 1, 4)))
    with pytest.raises(ValueError, match="fusion_kernel"):
        MageNet(dataclasses.replace(get_preset("tiny"), fusion_kernel=2))


def test_forward_under_bfloat16_autocast_is_finite(tiny: MageNet) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = tiny(rand_image(1, 3, 32, 32))
    assert all(torch.isfinite(t.float()).all() for t in [*output.images, *output.vessel_logits])


def test_guided_filter_reproduces_a_linear_signal() -> None:
    # If the signal is an exact affine function of the guide, the filter must return it at high res.
    guide_high = rand_image(1, 4, 16, 16)
    guide_low = torch.nn.functional.interpolate(guide_high, size=(8, 8), mode="bilinear", align_corners=False)
    signal_low = 3.0 * guide_low - 0.5
    attention = rand_image(1, 1, 8, 8, seed=5)
    out = AttentionGuidedFilter(radius=2, eps=1e-8)(guide_low, signal_low, guide_high, attention)
    torch.testing.assert_close(out, 3.0 * guide_high - 0.5, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("height", "width"), [(37, 53), (64, 64), (3, 2)], ids=["odd", "aligned", "tiny-replicate"]
)
def test_pad_then_crop_restores_the_input(height: int, width: int) -> None:
    x = rand_image(1, 3, height, width)
    padded, size = pad_to_multiple(x, 16)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert torch.equal(crop_to(padded, size), x)


def test_block_shapes() -> None:
    x = rand_image(2, 8, 16, 12)
    assert CAB(8, 4)(x).shape == x.shape
    feature, image = SAM(8)(x, rand_image(2, 3, 16, 12))
    assert feature.shape == x.shape and tuple(image.shape) == (2, 3, 16, 12)
    down = DownSample(8, 4)(x)
    assert tuple(down.shape) == (2, 12, 8, 6)
    assert SkipUpSample(8, 4)(down, x).shape == x.shape
    fab = FundusAttentionBlock(8, level_channels=6, rsp_channels=5, num_cab=2, reduction=4)
    out = fab(x, rand_image(2, 6, 8, 6), rand_image(2, 6, 8, 6), rand_image(2, 5, 4, 3))
    assert out.shape == x.shape


def test_activations_are_not_shared() -> None:
    network = MageNet(get_preset("tiny"))
    prelus = [m for m in network.modules() if isinstance(m, torch.nn.PReLU)]
    assert len(prelus) > 1
    assert len({id(m.weight) for m in prelus}) == len(prelus)


def test_tiny_parameter_count_is_pinned(tiny: MageNet) -> None:
    assert sum(p.numel() for p in tiny.parameters()) == TINY_PARAMETERS


def test_paper_parameter_count_is_in_range() -> None:
    network = MageNet(get_preset("paper"))
    total = sum(p.numel() for p in network.parameters())
    assert 8_000_000 <= total <= 20_000_000, total


def test_lite_flops_within_budget() -> None:
    gflops = count_gflops(MageNet(get_preset("lite")), 512)
    assert 30.0 <= gflops <= 60.0, gflops


def test_count_gflops_on_meta_matches_a_real_forward(tiny: MageNet) -> None:
    real = flops_module._count(tiny, 32, torch.device("cpu"))
    assert count_gflops(tiny, 32) == pytest.approx(real, rel=1e-9)
    assert next(tiny.parameters()).device.type == "cpu"


def test_count_gflops_scales_with_pixels(tiny: MageNet) -> None:
    small = count_gflops(tiny, 32)
    large = count_gflops(tiny, 64)
    assert small > 0
    assert large == pytest.approx(4 * small, rel=0.05)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name: str) -> None:
    config = get_preset(name)
    data = json.loads(json.dumps(config.to_dict()))
    assert MageNetConfig.from_dict(data) == config


def test_config_rejects_unknown_keys() -> None:
    data = get_preset("tiny").to_dict()
    data["n_feats"] = 3
    with pytest.raises(ValueError, match="n_feats"):
        MageNetConfig.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["vessels"]["depth"] = 5
    with pytest.raises(ValueError, match="depth"):
        MageNetConfig.from_dict(data)


def test_mid_preset_shares_lite_vessel_branch_and_adds_enhancement_capacity() -> None:
    """A ``lite`` phase-1 vessel branch must load into ``mid`` (the weight loader checks the config)."""
    lite, mid = MageNet(get_preset("lite")), MageNet(get_preset("mid"))
    assert get_preset("mid").vessels == get_preset("lite").vessels
    mid.vessels.load_state_dict(lite.vessels.state_dict(), strict=True)

    def enhancement_parameters(model: MageNet) -> int:
        return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.vessels.parameters())

    assert enhancement_parameters(mid) >= 2.5 * enhancement_parameters(lite)


def test_get_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="lite, mid, paper, tiny"):
        get_preset("huge")
