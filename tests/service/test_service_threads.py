"""OpenCV's threads per call in an API process: the cores each request-pool thread has to itself."""

from __future__ import annotations

import os
from collections.abc import Iterator

import cv2
import pytest

from service.app import create_app, share_cores_with_pool
from service.settings import Settings


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Eight cores, no operator override; OpenCV's own setting is restored afterwards."""
    monkeypatch.delenv("OPENCV_FOR_THREADS_NUM", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    before = cv2.getNumThreads()
    yield
    cv2.setNumThreads(before)


@pytest.mark.usefixtures("eight_cores")
def test_each_pool_thread_gets_its_share_of_the_cores() -> None:
    assert share_cores_with_pool(4) == 2
    assert share_cores_with_pool(3) == 2
    assert share_cores_with_pool(8) == 1
    assert share_cores_with_pool(16) == 1  # never zero


@pytest.mark.usefixtures("eight_cores")
def test_the_app_applies_its_pool_size() -> None:
    cv2.setNumThreads(8)
    create_app(Settings(cpu_workers=4, _env_file=None))  # type: ignore[call-arg]
    assert cv2.getNumThreads() == 2


@pytest.mark.usefixtures("eight_cores")
def test_an_operator_setting_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCV_FOR_THREADS_NUM", "3")
    cv2.setNumThreads(3)  # what OpenCV took from the variable at import
    assert share_cores_with_pool(4) == 3
