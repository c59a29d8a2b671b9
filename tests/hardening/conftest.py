"""Fixtures of the hardening tests: a real photograph at a small size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.dicom.builders import load_fundus_rgb


@pytest.fixture(scope="session")
def fundus_rgb(data_root: Path) -> np.ndarray:
    """A real HRF photograph at 128×96: uint8 [96, 128, 3]."""
    return load_fundus_rgb(data_root / "hrf" / "images" / "01_dr.jpg")


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    """The app on the tiny artifact, in process."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        weights=tiny_artifact,
        device="cpu",
        warmup=False,
        api_keys="",
        redis_url=None,
        log_level="WARNING",
        torch_threads=1,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client
