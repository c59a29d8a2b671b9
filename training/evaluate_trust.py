"""``fundus eval-trust``: do the trust signals of ``/enhance`` mean what they say?

On the fixed test split, each clean photograph at the working size is Cofe-degraded at a few fixed
seeds and enhanced like the service does (uint8 in and out). For every degraded copy it records:

* the quality grader's P(good) of the clean, degraded and enhanced image: does the degraded copy
  grade worse than its original, and does the enhanced one grade better than its input?
* the real error of the enhanced image (RMSE against the clean original inside the FOV) next to two
  uncertainty estimates: the disagreement of the two stages (what the service serves) and the
  disagreement of a horizontal-flip test-time augmentation (a second pass), with the Spearman
  correlation of each with the error;
* the structure fidelity of the enhancement (:func:`model.trust.structure_fidelity`), and how many
  copies would carry the structure warning at a few thresholds.

The real low-quality photographs of the split (no clean original) get their grades before and after.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import load_artifact
from model.device import select_device
from model.quality import load_quality
from model.trust import field_of_view, mean_in_fov, stage_disagreement, structure_fidelity
from training.evaluate import EVAL_SEED, collect_images, degrade_fixed
from training.metrics import image_tensor, uint8_image
from training.prepare import make_working, read_mask, read_rgb

log = logging.getLogger("training")

#: Thresholds of the structure warning whose trigger rates are reported.
DICE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 3:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty_like(v)
        r[order] = np.arange(v.size, dtype=np.float64)
        for value in np.unique(v):
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


class _Signals:
    """The served model's outputs and trust signals for one uint8 working image."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device

    @torch.inference_mode()
    def __call__(self, working: np.ndarray, tta: bool) -> dict[str, Any]:
        x = image_tensor(working)[None].to(self.device)
        out = self.model(x)
        image = out.images[0].clamp(0, 1)
        fov = field_of_view(x)
        result: dict[str, Any] = {
            "image": uint8_image(image[0].float()),
            "stage_uncertainty": mean_in_fov(stage_disagreement(out.images[0], out.images[1]), fov)[0],
        }
        vessels_in = torch.softmax(out.vessel_logits[-1].float(), dim=1)[:, 1]
        vessels_out = self.model.vessels.predict(image)[:, 0].float()
        result["fidelity"] = structure_fidelity(vessels_in, vessels_out, fov)[0].as_dict()
        if tta:
            flipped = self.model(x.flip(-1)).images[0].clamp(0, 1).flip(-1)
            result["flip_uncertainty"] = mean_in_fov(stage_disagreement(image, flipped), fov)[0]
        return result


def _rmse(image: np.ndarray, clean: np.ndarray, fov: np.ndarray) -> float:
    inside = fov > 0
    diff = image.astype(np.float64)[inside] - clean.astype(np.float64)[inside]
    return float(np.sqrt((diff**2).mean()) / 255.0)


def evaluate_trust(
    weights: str | Path,
    quality: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    seeds: int = 4,
    limit: int = 0,
    size: int = 512,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); writes and returns ``trust.json``."""
    started = time.monotonic()
    target = select_device(device)
    artifact = load_artifact(weights, target)
    grader = load_quality(quality)
    signals = _Signals(artifact.model, target)
    rows: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    items = collect_images(data, limit)
    for index, item in enumerate(items):
        record = item.record
        work = make_working(read_rgb(record.image), size, None, read_mask(record.fov) if record.fov else None)
        if item.group == "real":
            enhanced = signals(work.image, tta=False)
            p = grader.probabilities(np.stack([work.image, enhanced["image"]]))
            real.append({"image": item.label, "p_before": float(p[0]), "p_after": float(p[1])})
            continue
        clean_t, fov_t = image_tensor(work.image), torch.from_numpy(work.fov.astype(np.float32))
        for repeat in range(seeds):
            degraded_t, seed = degrade_fixed(clean_t, fov_t, EVAL_SEED + 100 * index + repeat)
            degraded = uint8_image(degraded_t)
            result = signals(degraded, tta=True)
            p = grader.probabilities(np.stack([work.image, degraded, result["image"]]))
            rows.append(
                {
                    "image": item.label,
                    "seed": seed,
                    "p_clean": float(p[0]),
                    "p_degraded": float(p[1]),
                    "p_enhanced": float(p[2]),
                    "error_degraded": _rmse(degraded, work.image, work.fov),
                    "error": _rmse(result["image"], work.image, work.fov),
                    "stage_uncertainty": result["stage_uncertainty"],
                    "flip_uncertainty": result["flip_uncertainty"],
                    **result["fidelity"],
                }
            )
        log.info("trust %d/%d: %s", index + 1, len(items), item.label)
    report = {
        "weights": str(weights),
        "version": artifact.version,
        "quality": str(quality),
        "quality_version": grader.version,
        "seeds_per_image": seeds,
        "size": size,
        "summary": summarise_trust(rows, real),
        "synthetic": rows,
        "real": real,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trust.json").write_text(json.dumps(report, indent=1))
    return report


def summarise_trust(rows: list[dict[str, Any]], real: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares and correlations of :func:`evaluate_trust`'s per-copy rows."""

    def share(condition: list[bool]) -> float:
        return round(float(np.mean(condition)), 4) if condition else float("nan")

    errors = [r["error"] for r in rows]
    dice = [r["dice"] for r in rows]
    summary: dict[str, Any] = {
        "pairs": len(rows),
        "degraded_graded_worse": share([r["p_degraded"] < r["p_clean"] for r in rows]),
        "enhanced_graded_better": share([r["p_enhanced"] > r["p_degraded"] for r in rows]),
        "mean_p_good": {
            name: round(float(np.mean([r[f"p_{name}"] for r in rows])), 4) if rows else float("nan")
            for name in ("clean", "degraded", "enhanced")
        },
        "spearman_stage_uncertainty_vs_error": round(
            spearman([r["stage_uncertainty"] for r in rows], errors), 4
        ),
        "spearman_flip_uncertainty_vs_error": round(
            spearman([r["flip_uncertainty"] for r in rows], errors), 4
        ),
        "mean_dice": round(float(np.mean(dice)), 4) if dice else float("nan"),
        "warning_rate": {str(t): share([d < t for d in dice]) for t in DICE_THRESHOLDS},
    }
    if real:
        summary["real"] = {
            "photographs": len(real),
            "enhanced_graded_better": share([r["p_after"] > r["p_before"] for r in real]),
            "mean_p_before": round(float(np.mean([r["p_before"] for r in real])), 4),
            "mean_p_after": round(float(np.mean([r["p_after"] for r in real])), 4),
        }
    return summary
