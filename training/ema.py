"""Mean-teacher EMA (Tarvainen & Valpola 2017; MODEL_SPEC §1.5).

After every optimiser step: α_eff = min(1 − 1/(step + 1), α) and θ_T ← α_eff·θ_T + (1 − α_eff)·θ_S
for every floating tensor of the state dict (parameters *and* floating buffers); integer buffers
are copied. The warm-up makes the teacher follow the student closely at the start, when the
student's early weights would otherwise dominate the average for thousands of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def effective_decay(step: int, decay: float) -> float:
    """α_eff = min(1 − 1/(step + 1), α); ``step`` counts completed optimiser steps from 0."""
    return min(1.0 - 1.0 / (step + 1), decay)


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached deep copy of ``student`` in eval mode with gradients disabled."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """θ_T ← decay·θ_T + (1 − decay)·θ_S for floating tensors; copy the rest.

    ``decay`` = 0 copies the student, 1 freezes the teacher. Both modules must share the same
    state-dict keys (pass the unwrapped student under DDP).
    """
    student_state = student.state_dict()
    for name, target in teacher.state_dict().items():
        source = student_state[name].detach()
        if torch.is_floating_point(target):
            if decay == 0.0:
                target.copy_(source)
            elif decay != 1.0:
                target.lerp_(source.to(target.dtype), 1.0 - decay)
        else:
            target.copy_(source)
