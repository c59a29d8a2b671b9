"""Pure step → value schedules: learning rate and consistency weight (MODEL_SPEC §1.5–1.6).

Everything takes the step explicitly, so resuming a run needs no hidden scheduler state beyond
the step counter (the LambdaLR in the trainer is checkpointed anyway).
"""

from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(−5 (1 − t/L)²) with t clipped to [0, L]; 1.0 when L = 0 (mean-teacher ramp-up)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(step: int, max_weight: float, rampup_steps: int) -> float:
    """w(t) = w_max · sigmoid_rampup(t, L)."""
    return max_weight * sigmoid_rampup(step, rampup_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, lr: float, lr_min: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then cosine from ``lr`` to ``lr_min``."""
    if lr <= 0:
        return 0.0
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    value = lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))
    return value / lr
