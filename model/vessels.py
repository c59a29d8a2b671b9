"""The retinal-structure-preservation (RSP) branch: an AG-Net style vessel segmenter (MODEL_SPEC §1.7).

Zhang et al., "Attention Guided Network for Retinal Image Segmentation" (MICCAI 2019): a U-Net with
multi-scale image inputs, GroupNorm encoders, and decoders whose ×2 upsampling is an
attention-weighted fast guided filter steered by the encoder features. Every decoder level has a
side output (2-class logits at full resolution); the network also returns their average.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import crop_to, pad_to_multiple, resize
from model.config import VesselNetConfig

SIZE_MULTIPLE = 16
"""Inputs are padded to a multiple of 16: four max-pools down to the centre block."""

NUM_CLASSES = 2
GROUP_NORM_EPS = 1e-4


@dataclass
class VesselOutput:
    """Outputs of :class:`VesselNet`.

    Attributes:
        logits: five (B, 2, H, W) logit maps: index 0 is the average of the four side outputs, then
            the sides of the decoder levels at H/8, H/4, H/2 and H (index 4 is the one used for
            prediction).
        features: the four decoder features, (B, 8w, H'/8, W'/8), (B, 4w, H'/4, W'/4),
            (B, 2w, H'/2, W'/2) and (B, w, H', W'), where H'×W' is the input padded to a multiple of 16.
    """

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class ConvNormReLU(nn.Sequential):
    """conv3×3 (no bias) → optional GroupNorm → ReLU. Shapes: (B, C_in, H, W) → (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int | None) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
        if norm_groups is not None:
            layers.append(nn.GroupNorm(norm_groups, out_channels, eps=GROUP_NORM_EPS))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class ImageConv(nn.Sequential):
    """AG-Net ``M_Conv``: conv3×3 with bias and ReLU on a rescaled input image.

    Shapes: (B, 3, h, w) → (B, C, h, w).
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__(nn.Conv2d(3, out_channels, 3, padding=1, bias=True), nn.ReLU())


class GridAttention(nn.Module):
    """Additive grid attention gate of AG-Net: sigmoid(ψ(ReLU(θ(guide) + φ(gate)))).

    Shapes: guide (B, C, h, w), gate (B, C, h', w') → attention (B, 1, h, w) in (0, 1).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.psi = nn.Conv2d(channels, 1, 1)

    def forward(self, guide: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        theta = self.theta(guide)
        phi = resize(self.phi(gate), theta.shape[-2:])
        return torch.sigmoid(self.psi(F.relu(theta + phi)))


class AttentionGuidedFilter(nn.Module):
    """Attention-weighted fast guided filter that upsamples a decoder signal using an encoder guide.

    At low resolution it fits, in every (2r+1)² window, the attention-weighted least-squares linear
    model ``signal ≈ A · guide + b`` (per channel), box-averages A and b, upsamples them bilinearly and
    applies them to the high-resolution guide. This is our formulation of AG-Net's
    ``FastGuidedFilter_attention``: weighted local means replace that code's batch-global attention
    normaliser, which is what forced it to float64. We compute in float32 (autocast disabled locally)
    because float64 is slow or unavailable on most accelerators and the weighted form is well
    conditioned: the variance is clamped at zero and regularised by ``eps``.

    Shapes: guide_low (B, C, h, w), signal_low (B, C, h, w), guide_high (B, C, H, W),
    attention (B, 1, h, w) → (B, C, H, W) in the signal's dtype.
    """

    def __init__(self, radius: int, eps: float) -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"guided filter radius must be >= 1, got {radius}")
        if eps <= 0:
            raise ValueError(f"guided filter eps must be > 0, got {eps}")
        self.radius = radius
        self.eps = eps

    def _box(self, x: torch.Tensor) -> torch.Tensor:
        size = 2 * self.radius + 1
        return F.avg_pool2d(x, size, stride=1, padding=self.radius, count_include_pad=False)

    def forward(
        self,
        guide_low: torch.Tensor,
        signal_low: torch.Tensor,
        guide_high: torch.Tensor,
        attention: torch.Tensor,
    ) -> torch.Tensor:
        out_dtype = signal_low.dtype
        device_type = signal_low.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()  # e.g. the meta device used for FLOP counting
        )
        with no_autocast:
            x = guide_low.float()
            y = signal_low.float()
            weight = attention.float() + 1e-6
            norm = self._box(weight)
            mean_x = self._box(weight * x) / norm
            mean_y = self._box(weight * y) / norm
            cov_xy = self._box(weight * x * y) / norm - mean_x * mean_y
            var_x = (self._box(weight * x * x) / norm - mean_x * mean_x).clamp_min(0.0)
            slope = cov_xy / (var_x + self.eps)
            offset = mean_y - slope * mean_x
            size = guide_high.shape[-2:]
            slope_high = resize(self._box(slope), size)
            offset_high = resize(self._box(offset), size)
            out = slope_high * guide_high.float() + offset_high
        return out.to(out_dtype)


class VesselNet(nn.Module):
    """AG-Net style vessel segmenter (MODEL_SPEC §1.7), widths w, 2w, 4w, 8w and a 16w centre.

    * multi-scale inputs: the image at 1/2, 1/4 and 1/8 through :class:`ImageConv` (2w, 4w, 8w
      channels), concatenated before encoders 2, 3 and 4;
    * encoders: 2 × (conv3×3 → GroupNorm → ReLU), then max-pool; the centre has no norm;
    * decoders: an :class:`AttentionGuidedFilter` (×2 upsampling guided by the image/encoder features
      of that scale, weighted by a :class:`GridAttention` map), then 3 × conv-GN-ReLU;
    * side outputs: 1×1 conv (with bias) to 2 classes, upsampled to H×W. The 1×1 conv runs before the
      bilinear upsampling; both are linear and the bilinear weights sum to one, so the result equals
      AG-Net's "upsample then conv" at a fraction of the cost.

    Any H×W works: the input is reflect-padded to a multiple of 16 and the logits cropped back.

    Args:
        config: widths, GroupNorm groups and guided-filter parameters.
    """

    def __init__(self, config: VesselNetConfig) -> None:
        super().__init__()
        width = config.width
        groups = config.norm_groups
        if width < 1:
            raise ValueError(f"vessel width must be >= 1, got {width}")
        if groups < 1 or width % groups != 0:
            raise ValueError(f"vessel norm_groups ({groups}) must be >= 1 and divide width ({width})")
        self.config = config
        self.width = width

        self.image_conv2 = ImageConv(2 * width)
        self.image_conv3 = ImageConv(4 * width)
        self.image_conv4 = ImageConv(8 * width)

        def encoder(in_channels: int, out_channels: int, norm: int | None = groups) -> nn.Sequential:
            return nn.Sequential(
                ConvNormReLU(in_channels, out_channels, norm), ConvNormReLU(out_channels, out_channels, norm)
            )

        self.down1 = encoder(3, width)
        self.down2 = encoder(3 * width, 2 * width)
        self.down3 = encoder(6 * width, 4 * width)
        self.down4 = encoder(12 * width, 8 * width)
        self.center = encoder(8 * width, 16 * width, norm=None)

        decoder_io = [
            (16 * width, 8 * width),
            (8 * width, 4 * width),
            (4 * width, 2 * width),
            (2 * width, width),
        ]
        self.attention = nn.ModuleList(GridAttention(c_in) for c_in, _ in decoder_io)
        self.guided_filter = AttentionGuidedFilter(config.guided_filter_radius, config.guided_filter_eps)
        self.decoders = nn.ModuleList(
            nn.Sequential(
                ConvNormReLU(c_in, c_out, groups),
                ConvNormReLU(c_out, c_out, groups),
                ConvNormReLU(c_out, c_out, groups),
            )
            for c_in, c_out in decoder_io
        )
        self.sides = nn.ModuleList(nn.Conv2d(c_out, NUM_CLASSES, 1, bias=True) for _, c_out in decoder_io)

    @property
    def feature_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four decoder features (H/8, H/4, H/2, H)."""
        return (8 * self.width, 4 * self.width, 2 * self.width, self.width)

    def forward_aligned(self, x: torch.Tensor) -> VesselOutput:
        """Forward pass for an input whose H and W are multiples of 16 (no padding, no cropping).

        Args:
            x: (B, 3, H, W) image in [0, 1], H and W divisible by 16.
        """
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(
                f"forward_aligned needs H and W divisible by {SIZE_MULTIPLE}, got {height}×{width}"
            )
        image2 = self.image_conv2(resize(x, (height // 2, width // 2)))
        image3 = self.image_conv3(resize(x, (height // 4, width // 4)))
        image4 = self.image_conv4(resize(x, (height // 8, width // 8)))

        enc1 = self.down1(x)
        enc2 = self.down2(torch.cat([image2, F.max_pool2d(enc1, 2)], dim=1))
        enc3 = self.down3(torch.cat([image3, F.max_pool2d(enc2, 2)], dim=1))
        enc4 = self.down4(torch.cat([image4, F.max_pool2d(enc3, 2)], dim=1))
        out = self.center(F.max_pool2d(enc4, 2))

        # Guides have the decoder input's channel count; at full resolution AG-Net has no image
        # branch and pairs the first encoder feature with itself.
        guides = [
            torch.cat([image4, enc4], dim=1),
            torch.cat([image3, enc3], dim=1),
            torch.cat([image2, enc2], dim=1),
            torch.cat([enc1, enc1], dim=1),
        ]
        features: list[torch.Tensor] = []
        for guide, attention, decoder in zip(guides, self.attention, self.decoders, strict=True):
            guide_low = resize(guide, out.shape[-2:])
            weights = attention(guide_low, out)
            out = decoder(self.guided_filter(guide_low, out, guide, weights))
            features.append(out)

        sides = [
            resize(side(feature), (height, width)) for side, feature in zip(self.sides, features, strict=True)
        ]
        average = torch.stack(sides, dim=0).mean(dim=0)
        return VesselOutput(logits=[average, *sides], features=features)

    def forward(self, x: torch.Tensor) -> VesselOutput:
        """Segment vessels in a (B, 3, H, W) image in [0, 1] of any size.

        Returns:
            :class:`VesselOutput` with logits cropped to H×W and features on the padded grid.
        """
        padded, size = pad_to_multiple(x, SIZE_MULTIPLE)
        output = self.forward_aligned(padded)
        return VesselOutput(
            logits=[crop_to(logits, size) for logits in output.logits], features=output.features
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Vessel probability (B, 1, H, W): softmax class 1 of the full-resolution side output.

        Runs under ``no_grad`` (not ``inference_mode``) so the result can serve as a training target.
        """
        logits = self.forward(x).logits[-1]
        return torch.softmax(logits.float(), dim=1)[:, 1:2]
