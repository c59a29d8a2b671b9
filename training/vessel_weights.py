"""Phase-1 product: the pretrained vessel (RSP) branch as a small safetensors file.

Metadata: ``kind`` = ``fundus-vessels``, ``vessel_config`` (``VesselNetConfig`` as JSON), ``preset``
and a JSON ``training`` summary. Later phases load it into ``MageNet.vessels`` or a bare
``VesselNet`` and refuse a file whose config differs from the model's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import VesselNetConfig
from model.vessels import VesselNet

KIND = "fundus-vessels"


def save_vessels(
    path: str | Path, net: VesselNet, config: VesselNetConfig, preset: str, training: dict[str, Any]
) -> None:
    """Write ``net``'s state dict with its config; atomic."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {
        "kind": KIND,
        "vessel_config": json.dumps(dataclasses.asdict(config)),
        "preset": preset,
        "training": json.dumps(training),
    }
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, target)


def load_vessels(path: str | Path, net: VesselNet, config: VesselNetConfig) -> dict[str, Any]:
    """Load weights into ``net`` after checking the stored config equals ``config``; returns metadata."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"vessel weights not found: {source} (run `fundus train rsp` first)")
    with safe_open(str(source), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if meta.get("kind") != KIND:
        raise ValueError(f"{source.name} is not a vessel-branch weight file")
    stored = VesselNetConfig.from_dict(json.loads(meta["vessel_config"]))
    if stored != config:
        raise ValueError(f"{source.name} was trained for {stored}, but the model uses {config}")
    with torch.no_grad():
        net.load_state_dict(tensors, strict=True)
    return {"preset": meta.get("preset", ""), "training": json.loads(meta.get("training", "{}"))}
