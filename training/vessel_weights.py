"""Phase-1 product: the pretrained vessel (RSP) branch as a small safetensors file.

Metadata: ``kind`` = ``fundus-vessels``, ``vessel_config`` (``VesselNetConfig`` as JSON), ``preset``
and a JSON ``training`` summary. Later phases load it into ``MageNet.vessels`` or a bare
``VesselNet`` and refuse a file whose config differs from the model's. A whole model artifact
(e.g. the bundled weights) is accepted too: its vessel branch is the phase-1 branch it was trained
with, so a run can continue from shipped weights without the phase-1 folder that made them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from model.artifact import ArtifactError, load_artifact, read_metadata
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
    """Load weights into ``net`` after checking the stored config equals ``config``; returns metadata.

    ``path`` is a phase-1 vessel file or a model artifact (its ``vessels`` branch is taken).
    """
    if _is_model_artifact(path):
        artifact = load_artifact(path, "cpu")
        if artifact.config.vessels != config:
            raise ValueError(
                f"{Path(path).name} has a vessel branch for {artifact.config.vessels}, "
                f"but the model uses {config}"
            )
        with torch.no_grad():
            net.load_state_dict(artifact.model.vessels.state_dict(), strict=True)
        training = artifact.training.get("rsp", {})
        return {"preset": artifact.preset, "training": training, "artifact": artifact.sha256}
    meta, tensors = read_weights(path, KIND, "vessel-branch weight file", "run `fundus train rsp` first")
    stored = VesselNetConfig.from_dict(json.loads(meta["vessel_config"]))
    if stored != config:
        raise ValueError(f"{Path(path).name} was trained for {stored}, but the model uses {config}")
    with torch.no_grad():
        net.load_state_dict(tensors, strict=True)
    return {"preset": meta.get("preset", ""), "training": json.loads(meta.get("training", "{}"))}


def _is_model_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a whole-model weight artifact rather than a phase-1 vessel file."""
    try:
        read_metadata(path)
    except ArtifactError:  # a vessel file, or something the vessel-file reader will refuse clearly
        return False
    return True
