"""Trust signals of the model side: stage disagreement, its uint8 map, structure fidelity."""

from __future__ import annotations

import pytest
import torch

from model.trust import (
    UNCERTAINTY_GAIN,
    field_of_view,
    mean_in_fov,
    stage_disagreement,
    structure_fidelity,
    uncertainty_to_uint8,
)


def test_disagreement_is_the_channel_mean_absolute_difference() -> None:
    a = torch.zeros(1, 3, 2, 2)
    b = torch.zeros(1, 3, 2, 2)
    b[0, 0, 0, 0] = 0.3  # one channel of one pixel
    b[0, :, 1, 1] = 1.7  # clamped to 1 before comparing
    d = stage_disagreement(a, b)
    assert d.shape == (1, 2, 2)
    assert d[0, 0, 0] == pytest.approx(0.1) and d[0, 1, 1] == pytest.approx(1.0) and d[0, 0, 1] == 0


def test_uint8_map_scales_and_saturates() -> None:
    d = torch.tensor([[[0.0, 0.01, 0.1, 0.5]]])
    values = uncertainty_to_uint8(d)
    assert values.dtype.name == "uint8" and values.shape == (1, 1, 4)
    assert values[0, 0].tolist() == [0, round(0.01 * 255 * UNCERTAINTY_GAIN), 102, 255]


def test_mean_counts_only_the_field_of_view() -> None:
    working = torch.zeros(2, 3, 4, 4)
    working[0, :, :2] = 0.5  # top half is the FOV
    fov = field_of_view(working)
    d = torch.zeros(2, 4, 4)
    d[0, :2] = 0.2
    d[0, 2:] = 0.9  # outside: ignored
    assert mean_in_fov(d, fov) == [pytest.approx(0.2), 0.0]  # no FOV at all → 0


def test_structure_fidelity_counts_removed_and_added_vessels() -> None:
    fov = torch.ones(1, 4, 4, dtype=torch.bool)
    before = torch.zeros(1, 4, 4)
    before[0, 0, :4] = 0.9  # 4 vessel pixels
    after = torch.zeros(1, 4, 4)
    after[0, 0, :2] = 0.8  # 2 kept, 2 removed
    after[0, 3, :3] = 0.7  # 3 added
    (result,) = structure_fidelity(before, after, fov)
    assert result.dice == pytest.approx(2 * 2 / (4 + 5), abs=1e-4)
    assert result.removed == pytest.approx(0.5) and result.added == pytest.approx(0.75)
    (same,) = structure_fidelity(before, before, fov)
    assert same.dice == 1.0 and same.removed == 0.0 and same.added == 0.0
    (empty,) = structure_fidelity(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), fov)
    assert empty.dice == 1.0


def test_structure_outside_the_fov_is_ignored() -> None:
    fov = torch.zeros(1, 4, 4, dtype=torch.bool)
    fov[0, :2] = True
    before = torch.zeros(1, 4, 4)
    before[0, 0, 0] = 1.0
    after = before.clone()
    after[0, 3, 3] = 1.0  # a new vessel outside the field of view
    (result,) = structure_fidelity(before, after, fov)
    assert result.dice == 1.0 and result.added == 0.0
