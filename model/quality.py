"""Fundus image quality grading: is a photograph good enough to read, or poor?

Binary on purpose: the labels available (DeepDRiD's ``overall_quality``: 0 = not good enough for
diagnosis, 1 = good enough) are binary, and the challenge's sub-scores (artifact, clarity, field
definition) measure other axes than a usable/reject split, so a three-way grade would be invented,
not learnt. The answer is the calibrated probability that the photograph is good (temperature
scaling fitted on held-out patients), and a grade: ``good`` at p ≥ 0.5, else ``poor``.

:class:`QualityNet` is a small CNN (about 0.2 M parameters) on the FOV-cropped working image
resized to :data:`QUALITY_SIZE`², cheap enough to run on every request: a few milliseconds on a CPU.
Weights live in one safetensors file (``kind`` = ``fundus-quality``) with the temperature and the
training summary in its metadata.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.weight_files import read_weights, state_tensors, write_weights

KIND = "fundus-quality"
#: Side of the square image the grader sees.
QUALITY_SIZE = 256
#: The quality model shipped with the repository.
BUNDLED_QUALITY = Path(__file__).resolve().parent / "weights" / "quality.safetensors"
GRADES = ("poor", "good")


class QualityNet(nn.Module):
    """Conv blocks (widths w, 2w, 4w, 8w, each conv-BN-ReLU ×2 then 2× pooling) after a stride-2 stem,
    then global average and max pooling and one linear layer: (B, 3, 256, 256) on [0, 1] → (B,) logits
    of "good"."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        channels = width
        for scale in (1, 2, 4, 8):
            out = width * scale
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


@dataclass
class QualityGrade:
    """A grade, its probabilities and the grader's version."""

    grade: str
    probabilities: dict[str, float]
    model_version: str

    def as_json(self) -> dict[str, Any]:
        return {"grade": self.grade, "probabilities": self.probabilities, "model_version": self.model_version}

    def header(self) -> str:
        """``good;p=0.91`` for a response header."""
        return f"{self.grade};p={self.probabilities['good']:.3f}"


@dataclass
class QualityModel:
    """A loaded grader: the network (eval mode), its temperature and metadata."""

    net: QualityNet
    temperature: float
    version: str
    training: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """P(good) of uint8 images (B, H, W, 3) RGB (any square size; resized to QUALITY_SIZE)."""
        batch = np.stack([_resize(image) for image in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        logits = self.net(x)
        return torch.sigmoid(logits / self.temperature).numpy().astype(np.float64)

    def tensor_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) P(good) of (B, 3, H, W) images on [0, 1] on the grader's device (call under inference
        mode). Square inputs are resized to QUALITY_SIZE by area averaging (nearest when enlarging), as
        the uint8 path's INTER_AREA does up to rounding: how the model process grades inside its pass."""
        side = images.shape[-1]
        if side % QUALITY_SIZE == 0 and images.shape[-2] == side and side > QUALITY_SIZE:
            # An integer factor (512 → 256): area averaging is a plain k×k average pool, the same
            # numbers in well under half the time.
            images = F.avg_pool2d(images, side // QUALITY_SIZE)
        elif images.shape[-2:] != (QUALITY_SIZE, QUALITY_SIZE):
            images = F.interpolate(
                images, size=(QUALITY_SIZE, QUALITY_SIZE), mode="area" if side > QUALITY_SIZE else "nearest"
            )
        images = images.float().contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.net(images) / self.temperature)

    def to(self, device: torch.device) -> QualityModel:
        """The same grader with its network on ``device``."""
        self.net.to(device)
        return self

    def grade(self, image: np.ndarray) -> QualityGrade:
        """Grade one uint8 (H, W, 3) RGB working image."""
        return grade_of(float(self.probabilities(image[None])[0]), self.version)


def grade_of(good: float, version: str) -> QualityGrade:
    """The grade for a P(good): ``good`` at 0.5 or more, else ``poor``."""
    return QualityGrade(
        grade="good" if good >= 0.5 else "poor",
        probabilities={"good": round(good, 4), "poor": round(1.0 - good, 4)},
        model_version=version,
    )


def _resize(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (QUALITY_SIZE, QUALITY_SIZE):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (QUALITY_SIZE, QUALITY_SIZE), interpolation=cv2.INTER_AREA)


def save_quality(path: str | Path, net: QualityNet, temperature: float, training: dict[str, Any]) -> str:
    """Write the grader (atomically); returns its version ``quality-<sha12>``."""
    tensors = state_tensors(net)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    version = f"quality-{digest.hexdigest()[:12]}"
    metadata = {
        "kind": KIND,
        "width": str(net.width),
        "temperature": repr(float(temperature)),
        "version": version,
        "training": json.dumps(training),
    }
    write_weights(path, tensors, metadata)
    return version


def for_inference(net: QualityNet) -> QualityNet:
    """An inference copy of ``net`` (eval mode): every conv → batch-norm pair folded into one biased
    conv, weights in channels-last layout.

    The same answers up to float rounding (logits within 1e-5 on [0, 1] inputs) for about a third less
    CPU time per grade: the batch-norm passes over every feature map disappear, and channels-last
    convolutions are faster here (the uint8 path's NHWC images are already in that layout).
    """
    net = copy.deepcopy(net).eval()
    layers = list(net.features)
    folded: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d) and folded and isinstance(folded[-1], nn.Conv2d):
            folded[-1] = fuse_conv_bn_eval(folded[-1], layer)
        else:
            folded.append(layer)
    net.features = nn.Sequential(*folded)
    return net.to(memory_format=torch.channels_last)


def load_quality(path: str | Path) -> QualityModel:
    """The grader stored at ``path`` (CPU, eval mode, folded for inference); ValueError when it is
    not one."""
    meta, tensors = read_weights(path, KIND, "quality model")
    net = QualityNet(int(meta["width"]))
    net.load_state_dict(tensors, strict=True)
    return QualityModel(
        net=for_inference(net),
        temperature=float(meta.get("temperature", "1.0")),
        version=meta.get("version", "quality"),
        training=json.loads(meta.get("training", "{}")),
    )


def logits_to_probability(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated P(good) from raw logits."""
    return torch.sigmoid(logits / temperature)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (0/1) on held-out logits."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), labels.float())
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))
