"""Device selection and mixed precision for inference and training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def select_device(preference: str = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|cuda:N`` to a device; ``cuda`` without a GPU is an error, not a fallback."""
    choice = preference.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {preference!r} requested but CUDA is not available")
        return torch.device(choice)
    raise ValueError(f"unknown device {preference!r}: expected auto, cpu or cuda[:N]")


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16/fp16 autocast on CUDA (bf16 where supported), a no-op on CPU."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield
    else:
        yield
