"""DICOM decompression bombs are refused before the bomb goes off (no GB allocations, no waiting)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from service.dicom.errors import DicomTooLarge, DicomUndecodable
from service.dicom.reader import read_dicom
from tests.hardening.bombs import deflate_bomb, jpeg_frame_bomb


@pytest.fixture(scope="module")
def small_rgb(fundus_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(fundus_rgb)


def test_deflated_dataset_that_expands_past_the_limit_is_refused(small_rgb: np.ndarray) -> None:
    bomb = deflate_bomb(small_rgb, inflated=1 << 30)
    assert len(bomb) < 2 << 20  # a ~1 MB upload holding a 1 GiB element
    tracemalloc.start()
    clock = time.perf_counter()
    try:
        with pytest.raises(DicomTooLarge):
            read_dicom(bomb, max_pixels=4_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - clock < 10


def test_deflated_dataset_within_the_limit_is_read(small_rgb: np.ndarray) -> None:
    photo = read_dicom(deflate_bomb(small_rgb, inflated=1 << 20), max_pixels=4_000_000)
    assert photo.pixels.shape == small_rgb.shape


def test_frame_larger_than_the_declared_image_is_refused_before_decoding(small_rgb: np.ndarray) -> None:
    bomb = jpeg_frame_bomb(small_rgb)
    tracemalloc.start()
    try:
        with pytest.raises(DicomUndecodable) as refused:
            read_dicom(bomb, max_pixels=64_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "dicom_undecodable"
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
