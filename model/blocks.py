"""Building blocks of MAGE-Net (MODEL_SPEC §1.3 and §2): channel attention, CAB, SAM, resampling
and the fundus attention block (FAB), plus the pad/crop helpers that enforce the size contract.

Conventions (STYLE_NOTES): 3×3 convs without bias, a fresh activation instance per block (no single
PReLU shared by the whole network), no in-place residual additions, and ``align_corners=False``
bilinear resampling to explicit target sizes (so odd intermediate sizes never drift by a pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ActLayer = type[nn.Module]


def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, *, bias: bool = False) -> nn.Conv2d:
    """Same-padding convolution (``padding = kernel_size // 2``), bias off as in MPRNet."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of ``x`` (B, C, h, w) to ``size`` = (H, W); a no-op when the size already matches."""
    target = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == target:
        return x
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom/right so H and W become multiples of ``multiple``.

    Reflect padding (as MPRNet's demo) keeps the image statistics at the border; replicate padding is
    the fallback when the image is too small for a reflection (pad >= side).

    Returns:
        The padded tensor and the original (H, W) for :func:`crop_to`.
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Top-left crop of (B, C, H', W') back to ``size`` = (H, W) (undoes :func:`pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (MPRNet ``CALayer``, MODEL_SPEC §2.1).

    Global average pool → 1×1 (C → C/r) → ReLU → 1×1 (C/r → C) → sigmoid, multiplied into the input.
    Shapes: (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 4, *, bias: bool = False) -> None:
        super().__init__()
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(f"channel attention needs channels ({channels}) >= reduction ({reduction}) >= 1")
        hidden = channels // reduction
        self.squeeze = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.excite = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.adaptive_avg_pool2d(x, 1)
        weights = torch.sigmoid(self.excite(F.relu(self.squeeze(weights))))
        return x * weights


class CAB(nn.Module):
    """Channel attention block (MPRNet, MODEL_SPEC §2.1): conv3×3 → act → conv3×3 → CA, plus the input.

    Shapes: (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 4, act_layer: ActLayer = nn.PReLU) -> None:
        super().__init__()
        self.conv1 = conv2d(channels, channels)
        self.act = act_layer()
        self.conv2 = conv2d(channels, channels)
        self.attention = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.attention(self.conv2(self.act(self.conv1(x))))
        return x + residual


def cab_stack(channels: int, count: int, reduction: int, act_layer: ActLayer = nn.PReLU) -> nn.Sequential:
    """``count`` CABs in sequence (an identity when ``count`` is 0)."""
    return nn.Sequential(*(CAB(channels, reduction, act_layer) for _ in range(count)))


class SAM(nn.Module):
    """Supervised attention module (MPRNet, MODEL_SPEC §2.1) with 1×1 convs.

    ``image = conv(feature) + x_image`` is the stage image (supervised with the clean target);
    the feature is gated by ``sigmoid(conv(image))`` and added back to the input feature.

    Shapes: feature (B, C, H, W), x_image (B, K, H, W) → feature (B, C, H, W), image (B, K, H, W).
    """

    def __init__(self, channels: int, image_channels: int = 3, kernel_size: int = 1) -> None:
        super().__init__()
        self.feature_conv = conv2d(channels, channels, kernel_size)
        self.to_image = conv2d(channels, image_channels, kernel_size)
        self.from_image = conv2d(image_channels, channels, kernel_size)

    def forward(self, feature: torch.Tensor, x_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.to_image(feature) + x_image
        gate = torch.sigmoid(self.from_image(image))
        out = self.feature_conv(feature) * gate + feature
        return out, image


class DownSample(nn.Module):
    """Bilinear ×0.5 then 1×1 conv C → C + extra. Shapes: (B, C, H, W) → (B, C+extra, H//2, W//2)."""

    def __init__(self, channels: int, extra: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels + extra, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (max(1, x.shape[-2] // 2), max(1, x.shape[-1] // 2))
        return self.proj(resize(x, size))


class UpSample(nn.Module):
    """Bilinear resize to ``size`` then 1×1 conv C + extra → C (no transposed conv).

    Shapes: (B, C+extra, h, w) → (B, C, H, W).
    """

    def __init__(self, channels: int, extra: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels + extra, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return self.proj(resize(x, size))


class SkipUpSample(nn.Module):
    """:class:`UpSample` to the skip's size, then add the skip.

    Shapes: x (B, C+extra, h, w), skip (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, extra: int) -> None:
        super().__init__()
        self.up = UpSample(channels, extra)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.up(x, skip.shape[-2:]) + skip


class FundusAttentionBlock(nn.Module):
    """Fundus attention block (FAB, MODEL_SPEC §1.3 item 3), at full resolution.

    1. ORB: ``num_cab`` CABs and a conv3×3, with a residual connection.
    2. Add the Stage-1 encoder and decoder features of this level, each reduced to ``width`` channels
       by a 1×1 conv and bilinearly resized to H×W. The 1×1 conv runs *before* the resize: a bias-free
       1×1 conv commutes with bilinear interpolation, so this equals "resize then reduce" at a fraction
       of the cost.
    3. Concatenate the vessel (RSP) decoder feature resized to H×W.
    4. The paper's "learnable non-linear transformation filter". Its definition is lost; our
       reconstruction is a conv (``fusion_kernel``) from ``width + rsp_channels`` back to ``width``
       followed by PReLU.

    Shapes: x (B, W, H, W'), enc/dec (B, C_level, h, w), rsp (B, C_rsp, h', w') → (B, W, H, W').
    """

    def __init__(
        self,
        width: int,
        level_channels: int,
        rsp_channels: int,
        *,
        num_cab: int,
        reduction: int = 4,
        fusion_kernel: int = 3,
        act_layer: ActLayer = nn.PReLU,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(cab_stack(width, num_cab, reduction, act_layer), conv2d(width, width))
        self.enc_proj = nn.Conv2d(level_channels, width, 1, bias=False)
        self.dec_proj = nn.Conv2d(level_channels, width, 1, bias=False)
        self.fusion = conv2d(width + rsp_channels, width, fusion_kernel)
        self.fusion_act = act_layer()

    def forward(
        self, x: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor, rsp: torch.Tensor
    ) -> torch.Tensor:
        size = x.shape[-2:]
        out = self.body(x) + x
        out = out + resize(self.enc_proj(enc), size) + resize(self.dec_proj(dec), size)
        out = torch.cat([out, resize(rsp, size)], dim=1)
        return self.fusion_act(self.fusion(out))
