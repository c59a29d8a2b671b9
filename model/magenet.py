"""MAGE-Net (Guo et al., IEEE TMI 2023), reconstructed as described in MODEL_SPEC §1.3.

Two parts:

* the multi-stage enhancement (MSE): Stage-1 is a 3-level U-Net of CABs run on the top and bottom
  halves of the image, ending in a supervised attention module (SAM) that gives the Stage-1 image;
  Stage-2 runs at full resolution: shallow conv + CAB, fusion with the SAM feature, three fundus
  attention blocks (FABs) and a tail conv whose output is added to the input;
* the retinal-structure-preservation (RSP) branch, :class:`model.vessels.VesselNet`, whose decoder
  features are concatenated inside the FABs and whose side outputs are supervised with vessel masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.blocks import (
    CAB,
    SAM,
    DownSample,
    FundusAttentionBlock,
    SkipUpSample,
    cab_stack,
    conv2d,
    crop_to,
    pad_to_multiple,
)
from model.config import MageNetConfig
from model.vessels import VesselNet

SIZE_MULTIPLE = 16
"""Inputs are reflect-padded to a multiple of 16: the vessel branch pools four times, Stage-1 splits
the image into halves and downsamples twice (needs 8)."""

IMAGE_CHANNELS = 3


@dataclass
class MageNetOutput:
    """Outputs of :class:`MageNet.forward`, all cropped to the input's H×W.

    Attributes:
        images: ``[stage2, stage1]``, each (B, 3, H, W), not clamped (the losses see raw values).
        vessel_logits: the five (B, 2, H, W) logit maps of :class:`model.vessels.VesselOutput`.
    """

    images: list[torch.Tensor]
    vessel_logits: list[torch.Tensor]


class StageOneEncoder(nn.Module):
    """Stage-1 encoder: 3 levels of widths n, n+s, n+2s, ``cabs`` CABs per level.

    Shapes: (B, n, H, W) → [(B, n, H, W), (B, n+s, H/2, W/2), (B, n+2s, H/4, W/4)].
    """

    def __init__(self, n_feat: int, step: int, cabs: int, reduction: int) -> None:
        super().__init__()
        self.level1 = cab_stack(n_feat, cabs, reduction)
        self.down12 = DownSample(n_feat, step)
        self.level2 = cab_stack(n_feat + step, cabs, reduction)
        self.down23 = DownSample(n_feat + step, step)
        self.level3 = cab_stack(n_feat + 2 * step, cabs, reduction)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc1 = self.level1(x)
        enc2 = self.level2(self.down12(enc1))
        enc3 = self.level3(self.down23(enc2))
        return [enc1, enc2, enc3]


class StageOneDecoder(nn.Module):
    """Stage-1 decoder: ``cabs`` CABs per level, bilinear + 1×1 upsampling, CAB-attended skips.

    Shapes: the encoder's three features → [dec1 (B, n, H, W), dec2 (B, n+s, H/2, W/2),
    dec3 (B, n+2s, H/4, W/4)].
    """

    def __init__(self, n_feat: int, step: int, cabs: int, reduction: int) -> None:
        super().__init__()
        self.level3 = cab_stack(n_feat + 2 * step, cabs, reduction)
        self.up32 = SkipUpSample(n_feat + step, step)
        self.skip2 = CAB(n_feat + step, reduction)
        self.level2 = cab_stack(n_feat + step, cabs, reduction)
        self.up21 = SkipUpSample(n_feat, step)
        self.skip1 = CAB(n_feat, reduction)
        self.level1 = cab_stack(n_feat, cabs, reduction)

    def forward(self, enc: list[torch.Tensor]) -> list[torch.Tensor]:
        enc1, enc2, enc3 = enc
        dec3 = self.level3(enc3)
        dec2 = self.level2(self.up32(dec3, self.skip2(enc2)))
        dec1 = self.level1(self.up21(dec2, self.skip1(enc1)))
        return [dec1, dec2, dec3]


class StageOne(nn.Module):
    """Stage-1 of the MSE (MPRNet's second stage without cross-stage fusion).

    The top and bottom halves go through the shared shallow conv + CAB and encoder (as one batch of
    2B); the per-level features are re-joined along H and decoded together; the SAM gives the
    Stage-1 image and the attention feature passed to Stage-2.

    Shapes: x (B, 3, H, W) with H, W divisible by 8 → feature (B, n, H, W), image (B, 3, H, W),
    enc and dec lists as in :class:`StageOneEncoder` / :class:`StageOneDecoder`.
    """

    def __init__(self, config: MageNetConfig) -> None:
        super().__init__()
        n, s, r = config.n_feat, config.scale_unetfeats, config.cab_reduction
        self.shallow = nn.Sequential(conv2d(IMAGE_CHANNELS, n), CAB(n, r))
        self.encoder = StageOneEncoder(n, s, config.unet_cabs, r)
        self.decoder = StageOneDecoder(n, s, config.unet_cabs, r)
        self.sam = SAM(n, IMAGE_CHANNELS)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        batch = x.shape[0]
        half = x.shape[-2] // 2
        halves = torch.cat([x[..., :half, :], x[..., half:, :]], dim=0)
        features = self.encoder(self.shallow(halves))
        enc = [torch.cat([f[:batch], f[batch:]], dim=-2) for f in features]
        dec = self.decoder(enc)
        feature, image = self.sam(dec[0], x)
        return feature, image, enc, dec


# Scale of the image-residual convs at initialisation (see MageNet._start_near_identity).
RESIDUAL_INIT_SCALE = 0.1


class MageNet(nn.Module):
    """MAGE-Net: Stage-1 U-Net, Stage-2 full-resolution FABs and the AG-Net vessel branch.

    Any H×W works: the input is reflect-padded to a multiple of 16 and every output cropped back.

    Args:
        config: the architecture (see :class:`model.config.MageNetConfig`).

    Attributes:
        config: the configuration the network was built from (stored in weight artifacts).
        vessels: the vessel (RSP) branch, usable on its own.
    """

    def __init__(self, config: MageNetConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        n, s, o = config.n_feat, config.scale_unetfeats, config.scale_orsnetfeats
        width = n + o
        self.vessels = VesselNet(config.vessels)
        self.stage1 = StageOne(config)
        self.stage2_shallow = nn.Sequential(conv2d(IMAGE_CHANNELS, n), CAB(n, config.cab_reduction))
        self.stage2_merge = conv2d(2 * n, width)
        level_channels = (n, n + s, n + 2 * s)
        rsp_channels = self.vessels.feature_channels
        self.fabs = nn.ModuleList(
            FundusAttentionBlock(
                width,
                level_channels[level],
                rsp_channels[config.rsp_to_fab[level]],
                num_cab=config.num_cab,
                reduction=config.cab_reduction,
                fusion_kernel=config.fusion_kernel,
            )
            for level in range(3)
        )
        self.tail = conv2d(width, IMAGE_CHANNELS)
        self._start_near_identity()

    @torch.no_grad()
    def _start_near_identity(self, scale: float = RESIDUAL_INIT_SCALE) -> None:
        """Shrink the convs that turn features into image residuals.

        Both stage images are ``residual + input``. With default initialisation the residuals start
        at a mean of ~0.1 on [0, 1] images (a random colour cast far worse than any degradation),
        and a short training budget is spent unlearning it. Scaled down, the network starts close
        to the identity and every step improves on the input; gradients still reach every layer.
        """
        self.tail.weight.mul_(scale)
        self.stage1.sam.to_image.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> MageNetOutput:
        """Enhance a (B, 3, H, W) image in [0, 1]; see :class:`MageNetOutput`."""
        _check_input(x)
        padded, size = pad_to_multiple(x, SIZE_MULTIPLE)
        vessel = self.vessels.forward_aligned(padded)
        feature, stage1_image, enc, dec = self.stage1(padded)
        out = self.stage2_merge(torch.cat([self.stage2_shallow(padded), feature], dim=1))
        for level, fab in enumerate(self.fabs):
            out = fab(out, enc[level], dec[level], vessel.features[self.config.rsp_to_fab[level]])
        stage2_image = self.tail(out) + padded
        return MageNetOutput(
            images=[crop_to(stage2_image, size), crop_to(stage1_image, size)],
            vessel_logits=[crop_to(logits, size) for logits in vessel.logits],
        )

    def infer(
        self, x: torch.Tensor, *, need_image: bool = True, need_vessels: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inference under ``torch.inference_mode``; does not change train/eval mode.

        Args:
            x: (B, 3, H, W) image in [0, 1].
            need_image: return the Stage-2 image clamped to [0, 1], (B, 3, H, W).
            need_vessels: return the vessel probability (B, 1, H, W). With ``need_image=False`` only
                the vessel branch runs.

        Returns:
            ``(image or None, vessel probability or None)``.
        """
        if not (need_image or need_vessels):
            raise ValueError("infer needs need_image or need_vessels")
        _check_input(x)
        with torch.inference_mode():
            if not need_image:
                return None, self.vessels.predict(x)
            output = self.forward(x)
            image = output.images[0].clamp(0.0, 1.0)
            vessels = torch.softmax(output.vessel_logits[-1].float(), dim=1)[:, 1:2] if need_vessels else None
        return image, vessels


def _check_input(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != IMAGE_CHANNELS:
        raise ValueError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1 or x.shape[0] < 1:
        raise ValueError(f"empty image tensor of shape {tuple(x.shape)}")


def _validate(config: MageNetConfig) -> None:
    """Reject configurations that cannot build a consistent network, with a precise message."""
    checks = {
        "n_feat": config.n_feat >= 1,
        "scale_unetfeats": config.scale_unetfeats >= 0,
        "scale_orsnetfeats": config.scale_orsnetfeats >= 0,
        "num_cab": config.num_cab >= 0,
        "unet_cabs": config.unet_cabs >= 0,
        "cab_reduction": 1 <= config.cab_reduction <= config.n_feat,
        "fusion_kernel": config.fusion_kernel >= 1 and config.fusion_kernel % 2 == 1,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(
            f"invalid MageNetConfig values: {', '.join(f'{b}={getattr(config, b)!r}' for b in bad)}"
        )
    if len(config.rsp_to_fab) != 3 or any(not 0 <= i <= 3 for i in config.rsp_to_fab):
        raise ValueError(f"rsp_to_fab must be three indices in 0..3, got {config.rsp_to_fab!r}")
