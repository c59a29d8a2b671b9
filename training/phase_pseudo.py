"""Pseudo vessel masks for clean images without a manual mask (the paper's AG-Net masks for EyeQ).

The pretrained vessel branch segments every image with role ``pseudo`` at the working size; the
probability is thresholded and zeroed outside the FOV, and written as a 0/255 PNG under
``<run>/pseudo-masks/<set>/<stem>.png``, where phase 2 looks for it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.device import select_device
from model.presets import get_preset
from model.vessels import VesselNet
from training.config import TrainConfig, dump_config
from training.prepare import WorkingCache, pseudo_mask_path, write_mask
from training.sources import build_split
from training.vessel_weights import load_vessels

log = logging.getLogger("training")
PHASE = "pseudo-masks"


def rsp_weights_path(config: TrainConfig, explicit: str) -> Path:
    """The vessel weights a later phase uses: ``explicit`` or this run's phase-1 output."""
    return Path(explicit) if explicit else config.phase_dir("rsp") / "rsp.safetensors"


def pseudo_dir_path(config: TrainConfig, explicit: str) -> Path:
    """The pseudo-mask folder: ``explicit`` or this run's ``pseudo-masks`` folder."""
    return Path(explicit) if explicit else config.phase_dir(PHASE)


@torch.no_grad()
def make_pseudo_masks(config: TrainConfig, *, out_dir: str | None = None) -> dict[str, Any]:
    """Segment all ``pseudo`` images and write their masks; returns a summary (also saved as JSON)."""
    started = time.monotonic()
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    device = select_device(config.run.device)
    folder = Path(out_dir) if out_dir else pseudo_dir_path(config, config.pseudo.out_dir)
    vessel_config = get_preset(config.model.preset).vessels
    net = VesselNet(vessel_config)
    weights = rsp_weights_path(config, config.pseudo.rsp_checkpoint)
    load_vessels(weights, net, vessel_config)
    net.to(device).eval()
    split = build_split(config.data)
    records = split.with_role("pseudo")
    cache = WorkingCache(config.data.cache_dir, config.data.working_size)
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(config, folder / "config.yaml")
    split.write(folder)
    batch = max(config.pseudo.batch_size, 1)
    fractions: list[float] = []
    for first in range(0, len(records), batch):
        chunk = records[first : first + batch]
        samples = [cache.load(r) for r in chunk]
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]).float().div(255)
        probs = net.predict(images.to(device))[:, 0].cpu().numpy()
        for record, sample, prob in zip(chunk, samples, probs, strict=True):
            mask = (prob >= config.pseudo.threshold).astype(np.uint8) & sample.fov
            write_mask(pseudo_mask_path(folder, record), mask)
            fractions.append(float(mask.sum()) / max(float(sample.fov.sum()), 1.0))
    summary = {
        "phase": PHASE,
        "images": len(records),
        "rsp_weights": str(weights),
        "threshold": config.pseudo.threshold,
        "mean_vessel_fraction_in_fov": round(float(np.mean(fractions)), 4) if fractions else 0.0,
        "wall_time_s": round(time.monotonic() - started, 1),
        "out_dir": str(folder),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    if fractions and summary["mean_vessel_fraction_in_fov"] < 0.01:
        # Real fundus vessels cover ~5-12 % of the FOV; near-empty masks mean an undertrained branch.
        log.warning(
            "pseudo-masks are nearly empty (%.2f %% vessels): train the vessel branch longer "
            "(check val/iou in the rsp log) or lower pseudo.threshold",
            100 * summary["mean_vessel_fraction_in_fov"],
        )
    log.info("wrote %d pseudo-masks to %s", len(records), folder)
    return summary
