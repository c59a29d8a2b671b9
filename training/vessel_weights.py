"""Phase-1 product: the pretrained vessel (RSP) branch as a small safetensors file.

Metadata: ``kind`` = ``fundus-vessels``, ``vessel_config`` (``VesselNetConfig`` as JSON), ``preset``
and a JSON ``training`` summary. Later phases load it into ``MageNet.vessels`` or a bare
``VesselNet`` and refuse a file whose config differs from the model's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from model.config import VesselNetConfig
from model.vessels import VesselNet
from model.weight_files import read_weights, state_tensors, write_weights

KIND = "fundus-vessels"


def save_vessels(
    path: str | Path, net: VesselNet, config: VesselNetConfig, preset: str, training: dict[str, Any]
) -> None:
    """Write ``net``'s state dict with its config; atomic."""
    metadata = {
        "kind": KIND,
        "vessel_config": json.dumps(dataclasses.asdict(config)),
        "preset": preset,
        "training": json.dumps(training),
    }
    write_weights(path, state_tensors(net), metadata)


def load_vessels(path: str | Path, net: VesselNet, config: VesselNetConfig) -> dict[str, Any]:
    """Load weights into ``net`` after checking the stored config equals ``config``; returns metadata."""
    meta, tensors = read_weights(path, KIND, "vessel-branch weight file", "run `fundus train rsp` first")
    stored = VesselNetConfig.from_dict(json.loads(meta["vessel_config"]))
    if stored != config:
        raise ValueError(f"{Path(path).name} was trained for {stored}, but the model uses {config}")
    with torch.no_grad():
        net.load_state_dict(tensors, strict=True)
    return {"preset": meta.get("preset", ""), "training": json.loads(meta.get("training", "{}"))}
