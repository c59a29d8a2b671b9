"""Fixtures for the service tests: settings on the tiny artifact, a running app, synthetic fundus images."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings


def fundus_array(width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: a textured orange disc (the FOV) on black, like a fundus photograph."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    radius = 0.45 * min(width, height)
    inside = (xs - width / 2) ** 2 + (ys - height / 2) ** 2 <= radius**2
    image = np.zeros((height, width, 3), dtype=np.uint8)
    base = np.array([170, 80, 35], dtype=np.int16)
    noise = rng.integers(-25, 25, size=(height, width, 3), dtype=np.int16)
    image[inside] = np.clip(base + noise[inside], 0, 255).astype(np.uint8)
    return image


def encode(array: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="session")
def make_settings(tiny_artifact: Path) -> Callable[..., Settings]:
    """Settings on the tiny artifact, independent of the process environment; overrides as kwargs."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "weights": tiny_artifact,
            "device": "cpu",
            "max_batch_size": 4,
            "max_batch_wait_ms": 2.0,
            "max_queue": 16,
            "request_timeout_s": 30.0,
            "api_keys": "",
            "redis_url": None,
            "cpu_workers": 2,
            "log_level": "WARNING",
            "warmup": False,
            "torch_threads": 1,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """One running app per test module (read-only use: tests that change state build their own)."""
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


@pytest.fixture
def png_bytes() -> bytes:
    return encode(fundus_array())
