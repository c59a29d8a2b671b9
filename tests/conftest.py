"""Fixtures shared by every test package: the data pack location and a small random-weight artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """``FUNDUS_DATA_ROOT`` or the ``shared/data`` pack beside the checkout."""
    configured = os.environ.get("FUNDUS_DATA_ROOT")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if not (root / "splits.json").is_file():
        pytest.fail(f"fundus data pack not found at {root} (set FUNDUS_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``tiny`` preset artifact with seeded random weights, written once per session."""
    from model.artifact import save_artifact
    from model.magenet import MageNet
    from model.presets import get_preset

    torch.manual_seed(0)
    network = MageNet(get_preset("tiny"))
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_artifact(path, network, preset="tiny", training={"note": "random weights for tests"})
    return path
