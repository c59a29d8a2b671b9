"""Faults outside the training family: each one changes the photograph, deterministically, and the
scoring tells a model that leaves them alone from one that makes them worse."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training.other_degradations import DEGRADATIONS, HARM_DB, defocus, score_image, summarise_kinds


def _photo(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc on black: (S, S, 3) uint8 and its (S, S) {0,1} FOV."""
    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.uniform(40, 220, (size, size, 3)).astype(np.float32), (0, 0), 1.5)
    yy, xx = np.mgrid[:size, :size]
    fov = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.45 * size) ** 2).astype(np.uint8)
    return (base * fov[..., None]).astype(np.uint8), fov


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_each_fault_changes_the_photograph_deterministically(kind: str) -> None:
    clean, _ = _photo(512)
    degrade = DEGRADATIONS[kind]
    first = degrade(clean.copy(), 7)
    assert first.shape == clean.shape and first.dtype == np.uint8
    assert np.abs(first.astype(int) - clean.astype(int)).mean() > 1.0
    np.testing.assert_array_equal(degrade(clean.copy(), 7), first)


def test_blur_sizes_follow_the_working_size() -> None:
    clean, _ = _photo(256)
    np.testing.assert_array_equal(defocus(clean, 0), cv2.GaussianBlur(clean, (0, 0), 1.0))


def test_scores_tell_leaving_alone_from_harm() -> None:
    clean, fov = _photo()
    identity = [score_image(clean, fov, 1, lambda x: x) for _ in range(2)]
    black = [score_image(clean, fov, 1, np.zeros_like) for _ in range(2)]

    left_alone = summarise_kinds(identity)
    assert set(left_alone) == set(DEGRADATIONS)
    for kind, scores in left_alone.items():
        assert scores["psnr_gain_mean"] == pytest.approx(0.0, abs=1e-9), kind
        assert scores["harmed"] == 0 and scores["photos"] == 2
    harmed = summarise_kinds(black)
    for kind, scores in harmed.items():
        assert scores["psnr_gain_worst"] < HARM_DB and scores["harmed"] == 2, kind
        assert scores["psnr_model"] < scores["psnr_degraded"]
