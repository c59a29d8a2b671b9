"""EMA teacher arithmetic and the ramp/LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.ema import effective_decay, ema_update, make_teacher
from training.schedules import consistency_weight, lr_factor, sigmoid_rampup


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = WithBuffers()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.running.fill_(4.0)
        student.count.fill_(7)
    return student, teacher


def test_decay_zero_copies_the_student() -> None:
    student, teacher = _pair()
    ema_update(teacher, student, 0.0)
    for name, value in student.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_decay_one_freezes_floats_but_copies_integer_buffers() -> None:
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    assert torch.equal(teacher.linear.weight, before["linear.weight"])
    assert torch.equal(teacher.running, before["running"])
    assert int(teacher.count) == 7


def test_decay_half_averages_parameters_and_float_buffers() -> None:
    student, teacher = _pair()
    old = teacher.linear.weight.clone()
    ema_update(teacher, student, 0.5)
    assert torch.allclose(teacher.linear.weight, 0.5 * old + 0.5 * student.linear.weight)
    assert torch.allclose(teacher.running, torch.full((2,), 2.0))


def test_teacher_is_detached_and_in_eval_mode() -> None:
    _, teacher = _pair()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_effective_decay_warms_up() -> None:
    assert effective_decay(0, 0.999) == 0.0
    assert effective_decay(1, 0.999) == pytest.approx(0.5)
    assert effective_decay(9, 0.999) == pytest.approx(0.9)
    assert effective_decay(100_000, 0.999) == 0.999


def test_sigmoid_rampup_endpoints() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(-3, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(7, 0) == 1.0
    assert consistency_weight(100, 2.0, 100) == 2.0


def test_lr_schedule_endpoints() -> None:
    assert lr_factor(0, 100, 10, 1e-3, 1e-5) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 1e-3, 1e-5) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 1e-3, 1e-5) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01)
    assert lr_factor(55, 100, 10, 1e-3, 1e-5) == pytest.approx((1e-5 + 0.5 * (1e-3 - 1e-5)) / 1e-3)
