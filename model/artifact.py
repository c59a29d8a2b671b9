"""Weight artifacts: one ``.safetensors`` file that carries everything needed to rebuild the model.

Metadata (all JSON strings, as safetensors only stores ``str -> str``):
    ``format``: ``"fundus-enhance"``; ``format_version``: ``"1"``;
    ``preset``: preset name the config came from (or ``"custom"``);
    ``config``: ``MageNetConfig.to_dict()``;
    ``tensors_sha256``: sha256 over the tensors (names, dtypes, shapes and bytes, sorted by name);
    ``training``: training summary (steps, wall time, data, hardware ...);
    ``metrics``: evaluation metrics; ``created``: ISO time.

Loading checks the format, the version and the tensor hash, so a truncated, edited or foreign file
gives an ``ArtifactError`` with a clear message instead of a half-loaded network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import MageNetConfig

if TYPE_CHECKING:
    from model.magenet import MageNet

FORMAT_NAME = "fundus-enhance"
FORMAT_VERSION = "1"
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tmagenet-lite.safetensors"


class ArtifactError(ValueError):
    """A weight file is missing, corrupt, or not a fundus-enhance artifact."""


@dataclass
class Artifact:
    """A loaded artifact: the network in eval mode plus its metadata."""

    model: MageNet
    config: MageNetConfig
    preset: str
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def version(self) -> str:
        """Short, human-readable weights version: preset plus the first 12 hex digits of the hash."""
        return f"{self.preset}-{self.sha256[:12]}"

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash names, dtypes, shapes and raw bytes of ``tensors`` in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # Flattened: a channels_last weight such as [C, C, 1, 1] counts as contiguous but keeps a
        # last-dimension stride other than 1, which a dtype view refuses.
        flat = tensor.contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_artifact(
    path: str | Path,
    model: MageNet,
    *,
    preset: str = "custom",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` (its ``config`` attribute and state dict) to ``path``; returns the tensor hash."""
    state = model.state_dict()
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    sha = tensors_sha256(tensors)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "config": json.dumps(model.config.to_dict()),
        "tensors_sha256": sha,
        "training": json.dumps(training or {}),
        "metrics": json.dumps(metrics or {}),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(target)
    return sha


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of an artifact without loading its tensors into a network."""
    source = Path(path)
    if not source.is_file():
        raise ArtifactError(f"weights file not found: {source}")
    try:
        with safe_open(str(source), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source.name} is not a readable safetensors file: {exc}") from exc
    if raw.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{source.name} is not a {FORMAT_NAME} artifact (format={raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{source.name} has format version {raw.get('format_version')!r}; "
            f"this build reads {FORMAT_VERSION}"
        )
    try:
        decoded: dict[str, Any] = {
            key: json.loads(raw[key]) for key in ("config", "training", "metrics") if key in raw
        }
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{source.name} has corrupt metadata: {exc}") from exc
    for key in ("format", "format_version", "preset", "tensors_sha256", "created"):
        decoded[key] = raw.get(key, "")
    return decoded


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Validate and load an artifact; the returned model is in eval mode on ``device``."""
    from model.magenet import MageNet

    source = Path(path)
    meta = read_metadata(source)
    try:
        config = MageNetConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{source.name} has an invalid model config: {exc}") from exc
    try:
        with safe_open(str(source), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source.name} has unreadable tensors: {exc}") from exc
    if tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise ArtifactError(f"{source.name} failed its integrity check (tensor sha256 mismatch)")
    model = MageNet(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{source.name} does not match its own config: {exc}") from exc
    model.to(device).eval()
    return Artifact(
        model=model,
        config=config,
        preset=str(meta.get("preset") or "custom"),
        sha256=str(meta["tensors_sha256"]),
        training=dict(meta.get("training") or {}),
        metrics=dict(meta.get("metrics") or {}),
        created=str(meta.get("created", "")),
    )
