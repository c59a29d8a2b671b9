"""An independent vessel segmenter for evaluation (the paper's protocol, not part of the product).

T-MAGE-Net's vessel metrics measured with its own RSP branch reward whatever that branch likes to
see. Following the paper, restored images are also judged by a separate segmenter trained only on
clean photographs with manual masks: if the enhancement makes vessels easier to find for a network
that never saw a degraded or enhanced image, the structure really is preserved.

:class:`SegmenterNet` is a plain 4-level U-Net (conv-GroupNorm-ReLU pairs, max-pool, bilinear
upsampling, concatenated skips) with one logit per pixel: a different architecture family from the
AG-Net branch, so the two do not share blind spots by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import crop_to, pad_to_multiple
from model.weight_files import read_weights, state_tensors, write_weights

KIND = "fundus-independent-segmenter"
#: The segmenter shipped with the repository (``fundus eval`` uses it unless told otherwise).
DEFAULT_SEGMENTER = Path(__file__).parent / "weights" / "segmenter.safetensors"
LEVELS = 4


def _pair(in_channels: int, out_channels: int) -> nn.Sequential:
    groups = min(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class SegmenterNet(nn.Module):
    """U-Net with widths w, 2w, 4w, 8w; (B, 3, H, W) on [0, 1] → (B, 1, H, W) vessel logits.

    Any H×W: the input is reflect-padded to a multiple of 8 and the output cropped back.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        widths = [width * 2**i for i in range(LEVELS)]
        self.encoders = nn.ModuleList(_pair(3 if i == 0 else widths[i - 1], widths[i]) for i in range(LEVELS))
        self.decoders = nn.ModuleList(
            _pair(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(LEVELS - 1))
        )
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, 2 ** (LEVELS - 1))
        skips: list[torch.Tensor] = []
        out = padded
        for index, encoder in enumerate(self.encoders):
            out = encoder(out if index == 0 else F.max_pool2d(out, 2))
            skips.append(out)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            out = F.interpolate(out, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            out = decoder(torch.cat([out, skip], dim=1))
        return crop_to(self.head(out), size)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Vessel probability (B, 1, H, W) of (B, 3, H, W) images on [0, 1]."""
        return torch.sigmoid(self.forward(x).float())


def segmenter_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (vessels are ~10 % of the pixels). logits, mask (B, 1, H, W)."""
    target = mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    prob = torch.sigmoid(logits.float())
    overlap = (prob * target).sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * overlap + 1.0) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + dice.mean()


def save_segmenter(path: str | Path, net: SegmenterNet, training: dict[str, Any]) -> None:
    """Write the weights with their width and a training summary; atomic."""
    metadata = {"kind": KIND, "width": str(net.width), "training": json.dumps(training)}
    write_weights(path, state_tensors(net), metadata)


def load_segmenter(path: str | Path, device: torch.device | None = None) -> SegmenterNet:
    """The segmenter stored at ``path``, in eval mode on ``device`` (CPU by default)."""
    meta, tensors = read_weights(path, KIND, "independent segmenter", "run `fundus train segmenter`")
    net = SegmenterNet(int(meta["width"]))
    net.load_state_dict(tensors, strict=True)
    return net.to(device or torch.device("cpu")).eval()
