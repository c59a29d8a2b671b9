"""A tiny, fast run configuration rooted in a temporary folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from training.config import TrainConfig, config_from_dict

SMOKE = Path(__file__).resolve().parents[2] / "training" / "configs" / "smoke.yaml"


def tiny_config(tmp: Path, data_root: Path, overrides: list[str] | None = None) -> TrainConfig:
    """The smoke config at 32² with 2 images per set, writing under ``tmp``."""
    raw: dict[str, Any] = yaml.safe_load(SMOKE.read_text())
    raw["run"]["out_root"] = str(tmp / "runs")
    raw["data"].update(
        root=str(data_root),
        cache_dir=str(tmp / "cache"),
        working_size=32,
        crop_size=24,
        limit_per_set=2,
        val_native_max_side=96,
    )
    raw["logging"].update(tensorboard=False, progress=False, log_every=1, val_every=2, checkpoint_every=2)
    raw["rsp"]["steps"] = 3
    raw["enhance"]["steps"] = 4
    return config_from_dict(raw, overrides)
