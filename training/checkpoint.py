"""Resumable training state: atomic checkpoint files and every RNG that influences a run.

A checkpoint holds the student, teacher, optimiser, LR scheduler, gradient scaler, the step (which
is also the data position, see :mod:`training.datasets`), the Python / NumPy / torch (CPU and
CUDA) RNG states and any named ``torch.Generator`` (the degradation and teacher-noise streams).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class StatefulParts:
    """Checkpoint state of a training task made of named parts (modules, optimiser, scheduler, scaler).

    Subclasses list their parts once in :meth:`stateful_parts`; saving and restoring then treat every
    part alike, so a part added to a task can never be saved but forgotten on resume.
    """

    def stateful_parts(self) -> dict[str, Any]:
        """Name → object with ``state_dict()`` / ``load_state_dict()``; names are checkpoint keys."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.stateful_parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.stateful_parts().items():
            part.load_state_dict(state[name])


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of the global RNGs and the given generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore a :func:`capture_rng` snapshot (generators by name; unknown names are errors)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint has no state for generator {name!r}")
        generator.set_state(saved[name])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, then rename: never a half-written checkpoint."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    source = Path(path)
    if source.is_dir():
        source = source / CHECKPOINT_NAME
    if not source.is_file():
        raise FileNotFoundError(f"no checkpoint at {source}")
    return torch.load(source, map_location="cpu", weights_only=False)
