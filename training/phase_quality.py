"""``fundus train quality``: the image-quality grader (:mod:`model.quality`) on DeepDRiD's labels.

Data: every DeepDRiD photograph of the pack with its ``overall_quality`` label, split **by patient**
into train / validation / held-out test (seeded); plus the clean training photographs of the clean
sets (never the fixed test split), graded good as they are and poor once Cofe-degraded on the fly, and
DeepDRiD's good photographs degraded now and then as extra poor examples, so synthetic degradations
rank below their clean originals. Validation picks the epoch and fits the temperature; the report
gives the held-out patients' ROC AUC, accuracy and calibration (expected calibration error before
and after temperature scaling), and the share of clean-vs-degraded pairs of the fixed test split in
which the degraded copy is graded worse.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model.degradation import degrade
from model.quality import QUALITY_SIZE, QualityNet, fit_temperature, logits_to_probability, save_quality
from training.config import TrainConfig
from training.evaluate import EVAL_SEED, degrade_fixed
from training.metrics import image_tensor, roc_auc, uint8_image
from training.prepare import WorkingCache
from training.sources import build_split, folder_set, load_test_keys

log = logging.getLogger("training")
PHASE = "quality"


def _patient_split(rows: list[dict[str, str]], seed: int, val: float, test: float) -> dict[str, str]:
    """patient id → ``train`` / ``val`` / ``test`` (seeded, by patient so no eye crosses over)."""
    patients = sorted({row["patient_id"] for row in rows}, key=lambda p: (len(p), p))
    random.Random(f"{seed}:quality").shuffle(patients)
    n_test, n_val = round(len(patients) * test), round(len(patients) * val)
    roles = {p: "test" for p in patients[:n_test]}
    roles.update({p: "val" for p in patients[n_test : n_test + n_val]})
    roles.update({p: "train" for p in patients[n_test + n_val :]})
    return roles


@dataclass
class _Example:
    """A training or pair photograph at working size: uint8 [S, S, 3], FOV float [S, S], 0/1 label,
    and whether it is one of the graded set's own photographs (else a clean extra)."""

    image: np.ndarray
    fov: np.ndarray
    label: int
    real: bool


def _fov_of(image: np.ndarray) -> np.ndarray:
    return (image.max(axis=2) > 12).astype(np.float32)


def _small(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (QUALITY_SIZE, QUALITY_SIZE), interpolation=cv2.INTER_AREA)


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _ece(probability: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(good) against 0/1 labels."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (probability >= low) & (probability < high if high < 1 else probability <= high)
        if inside.any():
            total += inside.mean() * abs(probability[inside].mean() - labels[inside].mean())
    return float(total)


@torch.no_grad()
def _logits(net: QualityNet, images: list[np.ndarray], batch: int = 32) -> torch.Tensor:
    net.eval()
    return (
        torch.cat([net(_tensor(images[i : i + batch])) for i in range(0, len(images), batch)])
        if images
        else torch.zeros(0)
    )


def train_quality(config: TrainConfig) -> dict[str, Any]:
    """Train, calibrate, evaluate and write ``<run>/quality/quality.safetensors`` and ``report.json``."""
    started = time.monotonic()
    q = config.quality
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    rng = np.random.default_rng(config.run.seed)
    root = Path(config.data.root)
    cache = WorkingCache(config.data.cache_dir, config.data.working_size)
    with (root / q.set / "quality.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    roles = _patient_split(rows, config.data.split_seed, q.val_fraction, q.test_fraction)
    by_stem = {r.stem: r for r in folder_set(root, q.set)}
    # Working-size images (degraded at the resolution the service degrades and grades at) for the
    # training photographs and the validation pairs; graded copies at QUALITY_SIZE for the rest.
    train: list[_Example] = []
    graded: dict[str, tuple[list[np.ndarray], list[int]]] = {"val": ([], []), "test": ([], [])}
    val_good: list[_Example] = []
    limit = config.data.limit_per_set
    kept: dict[tuple[str, int], int] = {}
    for row in rows:
        record = by_stem.get(row["stem"])
        label, role = int(row["overall_quality"]), roles[row["patient_id"]]
        if record is None or (limit and kept.get((role, label), 0) >= limit):
            continue
        kept[(role, label)] = kept.get((role, label), 0) + 1
        image = cache.load(record).image
        if role == "train":
            train.append(_Example(image, _fov_of(image), label, real=True))
            continue
        graded[role][0].append(_small(image))
        graded[role][1].append(label)
        if role == "val" and label == 1:
            val_good.append(_Example(image, _fov_of(image), label, real=True))
    clean_records = [r for r in build_split(config.data).with_role("clean") if r.set != q.set]
    n_real = len(train)
    for record in clean_records:
        sample = cache.load(record)
        train.append(_Example(sample.image, sample.fov.astype(np.float32), 1, real=False))
    log.info(
        "quality data: %s patients, train %d / val %d / test %d photographs, %d clean extras",
        len(set(roles)), n_real, len(graded["val"][0]), len(graded["test"][0]), len(train) - n_real,
    )  # fmt: skip

    net = QualityNet(q.width)
    optimiser = torch.optim.AdamW(net.parameters(), lr=q.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(train) // q.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=q.lr, total_steps=q.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.run.seed)
    best: tuple[float, dict[str, torch.Tensor], int] = (-1.0, {}, -1)
    history = []
    for epoch in range(q.epochs):
        net.train()
        order = rng.permutation(len(train))
        for step in range(steps_per_epoch):
            chosen = [train[j] for j in order[step * q.batch_size : (step + 1) * q.batch_size]]
            if not chosen:
                continue
            loss = _training_loss(net, chosen, rng, generator, q.degrade_good_prob, q.ranking_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        val_logits = _logits(net, graded["val"][0])
        val_auc = roc_auc(val_logits, torch.tensor(graded["val"][1]))
        val_pairs = _pair_ranking(net, 1.0, val_good, repeats=1)["degraded_graded_worse"]
        score = 0.5 * (float(np.nan_to_num(val_auc)) + val_pairs)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": round(float(loss.detach()), 4),
                "val_auc": round(val_auc, 4),
                "val_pairs": val_pairs,
            }
        )
        log.info(
            "quality epoch %d: loss %.4f, validation AUC %.4f, degraded graded worse %.3f",
            epoch + 1, float(loss.detach()), val_auc, val_pairs,
        )  # fmt: skip
        if score > best[0] or not best[1]:
            best = (score, {k: v.clone() for k, v in net.state_dict().items()}, epoch + 1)
    net.load_state_dict(best[1])
    val_logits = _logits(net, graded["val"][0])
    temperature = fit_temperature(val_logits, torch.tensor(graded["val"][1]))
    test_logits = _logits(net, graded["test"][0])
    test_labels = np.asarray(graded["test"][1])
    raw = torch.sigmoid(test_logits).numpy()
    calibrated = logits_to_probability(test_logits, temperature).numpy()
    report: dict[str, Any] = {
        "phase": PHASE,
        "data": {
            "set": q.set,
            "patients": {
                role: sum(1 for r in roles.values() if r == role) for role in ("train", "val", "test")
            },
            "photographs": {"train": n_real, **{role: len(graded[role][0]) for role in graded}},
            "clean_extras": len(train) - n_real,
        },
        "selected_epoch": best[2],
        "temperature": round(temperature, 4),
        "held_out": {
            "roc_auc": round(roc_auc(test_logits, torch.from_numpy(test_labels)), 4),
            "accuracy": round(float(((calibrated >= 0.5) == (test_labels == 1)).mean()), 4),
            "ece_raw": round(_ece(raw, test_labels), 4),
            "ece_calibrated": round(_ece(calibrated, test_labels), 4),
            "good_share": round(float(test_labels.mean()), 4),
        },
        "pairs": _pair_ranking(net, temperature, _test_examples(config, limit), repeats=4),
        "history": history,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    folder = config.phase_dir(PHASE)
    folder.mkdir(parents=True, exist_ok=True)
    report["version"] = save_quality(folder / "quality.safetensors", net, temperature, report)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    report["weights"] = str(folder / "quality.safetensors")
    return report


def _training_loss(
    net: QualityNet,
    chosen: list[_Example],
    rng: np.random.Generator,
    generator: torch.Generator,
    degrade_good_prob: float,
    ranking_weight: float,
) -> torch.Tensor:
    """Cross-entropy on the batch, where some good photographs are Cofe-degraded into poor ones at
    working size, plus a pairwise ranking term that wants every degraded copy graded below its
    original (which joins the batch as a good example)."""
    degrade_mask = [
        example.label == 1 and rng.random() < (degrade_good_prob if example.real else 0.5)
        for example in chosen
    ]
    x = _tensor([example.image for example in chosen])
    labels = [0 if poor else example.label for example, poor in zip(chosen, degrade_mask, strict=True)]
    flags = torch.tensor(degrade_mask)
    n_pairs = int(flags.sum())
    if n_pairs:
        fov = torch.from_numpy(np.stack([example.fov for example in chosen]))[:, None]
        originals = x[flags].clone()
        x[flags], _ = degrade(x[flags], fov[flags], generator=generator, mode="cofe")
        x = torch.cat([x, originals])
        labels += [1] * n_pairs
    x = F.interpolate(x, size=(QUALITY_SIZE, QUALITY_SIZE), mode="area")
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    logits = net(x)
    loss = F.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float32))
    if n_pairs and ranking_weight > 0:
        degraded_logits = logits[: len(chosen)][flags]
        loss = loss + ranking_weight * F.softplus(degraded_logits - logits[len(chosen) :]).mean()
    return loss


def _test_examples(config: TrainConfig, limit: int = 0) -> list[_Example]:
    """The fixed test split's photographs at working size, with their FOV masks (at most ``limit``)."""
    root = Path(config.data.root)
    cache = WorkingCache(config.data.cache_dir, config.data.working_size)
    examples = []
    for key in sorted(load_test_keys(root)):
        name, stem = key.split("/", 1)
        record = next((r for r in folder_set(root, name) if r.stem == stem), None)
        if record is not None:
            sample = cache.load(record)
            examples.append(_Example(sample.image, sample.fov.astype(np.float32), 1, real=True))
        if limit and len(examples) >= limit:
            break
    return examples


def _pair_ranking(
    net: QualityNet, temperature: float, examples: list[_Example], repeats: int
) -> dict[str, Any]:
    """Clean vs Cofe-degraded copies (fixed seeds, at working size): how often the copy grades worse."""
    worse = 0
    total = 0
    for index, example in enumerate(examples):
        clean = image_tensor(example.image)
        fov = torch.from_numpy(example.fov)
        for repeat in range(repeats):
            degraded, _ = degrade_fixed(clean, fov, EVAL_SEED + 100 * index + repeat)
            pair = [
                _small(example.image),
                _small(uint8_image(degraded)),
            ]
            p = logits_to_probability(_logits(net, pair), temperature).numpy()
            worse += int(p[1] < p[0])
            total += 1
    return {"pairs": total, "degraded_graded_worse": round(worse / max(total, 1), 4)}
