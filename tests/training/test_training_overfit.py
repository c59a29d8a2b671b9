"""Two-image overfit: the supervised T-MAGE-Net loss drops clearly in a few steps."""

from __future__ import annotations

from pathlib import Path

import torch

from model.degradation import degrade
from model.magenet import MageNet
from model.presets import get_preset
from tests.training.helpers import tiny_config
from training.losses import RestorationLoss, multiscale_segmentation
from training.prepare import WorkingCache
from training.sources import build_split


def test_two_images_overfit(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    records = build_split(config.data).with_role("vessel")[:2]
    cache = WorkingCache(config.data.cache_dir, 32)
    samples = [cache.load(r) for r in records]
    clean = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]).float() / 255
    fov = torch.stack([torch.from_numpy(s.fov)[None] for s in samples]).float()
    vessel = torch.stack([torch.from_numpy(s.vessel)[None] for s in samples]).float()
    degraded, _ = degrade(clean, fov, generator=torch.Generator().manual_seed(1), types=["illumination"])
    torch.manual_seed(0)
    model = MageNet(get_preset("tiny"))
    restore = RestorationLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(degraded)
        loss = restore(out.images, clean)["restore"] + 0.5 * multiscale_segmentation(
            out.vessel_logits, vessel, False
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
