"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode`` over the real forward pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_gflops(model: nn.Module, size: int = 512) -> float:
    """GFLOPs of one forward pass on a single 3×size×size image.

    FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matmuls (resampling,
    pooling, normalisation and element-wise ops are not counted), which is the convention the
    "≤ 60 GFLOPs" budget of the ``lite`` preset refers to.

    The forward runs on the ``meta`` device (shapes only, parameters swapped in through
    ``functional_call``), so counting the 1.2-TFLOP ``paper`` preset takes about a second instead of
    a full CPU forward, and ``model`` itself is neither copied nor modified. A model with an op that
    has no meta kernel falls back to a real forward on its own device.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    try:
        return _count(model, size, torch.device("meta"))
    except (NotImplementedError, RuntimeError):
        parameter = next(model.parameters(), None)
        return _count(model, size, parameter.device if parameter is not None else torch.device("cpu"))


def _count(model: nn.Module, size: int, device: torch.device) -> float:
    state = {name: tensor.to(device) for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        functional_call(model, state, (x,))
    return counter.get_total_flops() / 1e9
