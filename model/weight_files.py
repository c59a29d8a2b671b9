"""Small single-network weight files (safetensors with a ``kind`` tag in their metadata).

The vessel branch of phase 1, the independent evaluation segmenter and the quality grader are each
one network's state dict plus a few metadata strings; this module writes such a file atomically
(readable by the service's unprivileged user) and reads it back, refusing a file of another kind.
The full T-MAGE-Net artifact has its own, richer format (:mod:`model.artifact`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of ``net``'s state dict."""
    return {name: value.detach().cpu().contiguous().clone() for name, value in net.state_dict().items()}


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` (which must hold ``kind``) to ``path``, atomically."""
    if "kind" not in metadata:
        raise ValueError("weight-file metadata needs a kind")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # shipped files are read by the service's unprivileged user
    os.replace(tmp, target)


def read_weights(
    path: str | Path, kind: str, what: str, hint: str = ""
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the ``kind`` file at ``path``.

    Raises FileNotFoundError (naming ``what``, e.g. "quality model", plus ``hint``) when it is
    missing and ValueError when it is another kind of file.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{what} not found: {source}{f' ({hint})' if hint else ''}")
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if metadata.get("kind") != kind:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ValueError(
            f"{source.name} is not {article} {what} (kind {metadata.get('kind')!r}, expected {kind!r})"
        )
    return metadata, tensors
