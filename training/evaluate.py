"""``fundus eval``: how much a weight artifact restores held-out fundus photographs.

Synthetic group (clean held-out images, e.g. the HRF test split): each image is FOV-cropped to
the working size, degraded with the Cofe-Net model at a fixed seed, then restored. Reported in the
FOV: PSNR/SSIM of the degraded input, of a CLAHE baseline (LAB luminance channel) and of the
model; vessel AUC/accuracy/IoU of the artifact's own vessel segmenter on the clean, degraded,
CLAHE and enhanced images against the manual masks (or, without masks, against the segmentation
of the clean image), and the share of the clean-vs-degraded AUC gap the enhancement recovers.

Real group (real images with manual masks and no clean reference, e.g. the CHASE_DB1 test split):
vessel AUC of the segmenter on the raw vs the enhanced image.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.artifact import load_artifact
from model.degradation import degrade_image
from model.device import select_device
from training.metrics import psnr, ssim, vessel_metrics
from training.prepare import make_working, read_mask, read_rgb
from training.report import write_html
from training.sources import ImageRecord, folder_set, list_images, load_test_keys

log = logging.getLogger("training")
EVAL_SEED = 10_000
REAL_SETS = ("chase_db1",)


@dataclass
class EvalImage:
    """One evaluation image: an anonymous label, its record, and its group."""

    label: str
    record: ImageRecord
    group: str


def collect_images(
    data: str | Path, limit: int = 0, real_sets: tuple[str, ...] = REAL_SETS
) -> list[EvalImage]:
    """The test split of a data root (``splits.json``), or every image of a plain folder."""
    root = Path(data)
    if (root / "splits.json").is_file():
        keys = load_test_keys(root)
        by_set: dict[str, list[str]] = {}
        for key in sorted(keys):
            name, stem = key.split("/", 1)
            by_set.setdefault(name, []).append(stem)
        images: list[EvalImage] = []
        for name in sorted(by_set):
            found = {r.stem: r for r in folder_set(root, name)}
            group = "real" if name in real_sets else "synthetic"
            picked = [found[s] for s in sorted(by_set[name]) if s in found]
            if group == "real":
                picked = [r for r in picked if r.vessel is not None]
            images += [EvalImage(r.key, r, group) for r in picked]
        synthetic = [i for i in images if i.group == "synthetic"]
        real = [i for i in images if i.group == "real"]
        if limit > 0:
            synthetic, real = synthetic[:limit], real[:limit]
        return synthetic + real
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data not found: {root}")
    files = list_images(root)
    if not files:
        raise FileNotFoundError(f"no images in {root}")
    if limit > 0:
        files = files[:limit]
    # Plain folders may hold patient files: the report names images by position only.
    return [
        EvalImage(f"image_{i:03d}", ImageRecord("folder", p.stem, p), "synthetic")
        for i, p in enumerate(files)
    ]


def degrade_fixed(
    clean: torch.Tensor,
    fov: torch.Tensor,
    seed: int,
    *,
    types: list[str] | None = None,
    mode: str = "cofe",
    max_psnr: float = 50.0,
    tries: int = 8,
) -> tuple[torch.Tensor, int]:
    """Degrade (3, S, S) ``clean`` at a fixed seed, skipping draws that leave it unchanged.

    Some Cofe draws are no-ops (e.g. blur alone with a 1-pixel kernel); an unchanged image has an
    unbounded PSNR that would dominate the mean, so the next seed (``seed + 1000·k``) is used until
    the degraded image differs (PSNR below ``max_psnr`` dB). Returns (degraded, seed used).
    """
    degraded = clean
    used = seed
    for attempt in range(tries):
        used = seed + 1000 * attempt
        degraded, _ = degrade_image(clean, fov[None] if fov.ndim == 2 else fov, used, types=types, mode=mode)
        if psnr(degraded.float(), clean, fov) < max_psnr:
            break
    return degraded.float(), used


def clahe_baseline(image: np.ndarray, fov: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE on the L channel of LAB (Setiawan et al. 2013 style); (S, S, 3) uint8 → same."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    lab[..., 0] = clahe.apply(lab[..., 0])
    out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return (out * fov[..., None]).astype(np.uint8)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _gap(clean: float, degraded: float, enhanced: float) -> float:
    """Share of the clean-vs-degraded gap recovered by the enhanced image."""
    gap = clean - degraded
    return float("nan") if abs(gap) < 1e-9 else (enhanced - degraded) / gap


def evaluate(
    weights: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    limit: int = 0,
    size: int = 512,
    device: str = "auto",
    mode: str = "cofe",
) -> dict[str, Any]:
    """Run the evaluation and write ``report.json``, ``report.html`` and ``images/``."""
    if size <= 0 or size % 8:
        raise ValueError("--size must be a positive multiple of 8")
    started = time.monotonic()
    target = select_device(device)
    artifact = load_artifact(weights, target)
    model = artifact.model
    stage = 1 if artifact.training.get("supervised_stages") == [1] else 0
    folder = Path(out)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = collect_images(data, limit)

    def enhance(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x[None].to(target)).images[stage][0].clamp(0, 1).float().cpu()

    def segment(x: torch.Tensor) -> torch.Tensor:
        return model.vessels.predict(x[None].to(target))[0, 0].float().cpu()

    synthetic: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        record = item.record
        work = make_working(
            read_rgb(record.image),
            size,
            read_mask(record.vessel) if record.vessel else None,
            read_mask(record.fov) if record.fov else None,
        )
        fov = torch.from_numpy(work.fov.astype(np.float32))
        clean = _to_tensor(work.image)
        row: dict[str, Any] = {"image": item.label, "group": item.group}
        if item.group == "real":
            enhanced = enhance(clean)
            assert work.vessel is not None
            manual = torch.from_numpy(work.vessel)
            for name, img in (("raw", clean), ("enhanced", enhanced)):
                for key, value in vessel_metrics(segment(img), manual, fov).items():
                    row[f"vessel_{key}_{name}"] = value
            grid = [work.image, _to_uint8(enhanced)]
            row["grid"] = _save_grid(folder, index, grid)
            real.append(row)
            continue
        degraded, row["seed"] = degrade_fixed(clean, fov, EVAL_SEED + index, mode=mode)
        clahe = _to_tensor(clahe_baseline(_to_uint8(degraded), work.fov))
        enhanced = enhance(degraded)
        variants = {"degraded": degraded, "clahe": clahe, "model": enhanced}
        for name, img in variants.items():
            row[f"psnr_{name}"] = psnr(img, clean, fov)
            row[f"ssim_{name}"] = ssim(img, clean, fov)
        clean_prob = segment(clean)
        reference = torch.from_numpy(work.vessel) if work.vessel is not None else (clean_prob >= 0.5).float()
        row["vessel_reference"] = "manual" if work.vessel is not None else "clean-image segmentation"
        for name, img in (("clean", clean), ("degraded", degraded), ("clahe", clahe), ("enhanced", enhanced)):
            prob = clean_prob if name == "clean" else segment(img)
            for key, value in vessel_metrics(prob, reference, fov).items():
                row[f"vessel_{key}_{name}"] = value
        row["grid"] = _save_grid(
            folder, index, [_to_uint8(degraded), _to_uint8(clahe), _to_uint8(enhanced), work.image]
        )
        synthetic.append(row)
        log.info(
            "eval %d/%d: psnr %.2f → %.2f dB", index + 1, len(items), row["psnr_degraded"], row["psnr_model"]
        )

    summary: dict[str, Any] = {"synthetic_images": len(synthetic), "real_images": len(real)}
    for name in ("degraded", "clahe", "model"):
        summary[f"psnr_{name}"] = _mean(synthetic, f"psnr_{name}")
        summary[f"ssim_{name}"] = _mean(synthetic, f"ssim_{name}")
    summary["psnr_gain_vs_degraded"] = summary["psnr_model"] - summary["psnr_degraded"]
    summary["psnr_gain_vs_clahe"] = summary["psnr_model"] - summary["psnr_clahe"]
    for key in ("auc", "acc", "iou"):
        for name in ("clean", "degraded", "clahe", "enhanced"):
            summary[f"vessel_{key}_{name}"] = _mean(synthetic, f"vessel_{key}_{name}")
        summary[f"vessel_{key}_gap_recovered"] = _gap(
            summary[f"vessel_{key}_clean"],
            summary[f"vessel_{key}_degraded"],
            summary[f"vessel_{key}_enhanced"],
        )
        for name in ("raw", "enhanced"):
            summary[f"real_vessel_{key}_{name}"] = _mean(real, f"vessel_{key}_{name}")
    report = {
        "weights": str(weights),
        "version": artifact.version,
        "preset": artifact.preset,
        "data": str(data),
        "size": size,
        "degradation_mode": mode,
        "seed_base": EVAL_SEED,
        "device": str(target),
        "wall_time_s": round(time.monotonic() - started, 1),
        "summary": summary,
        "synthetic": synthetic,
        "real": real,
    }
    (folder / "report.json").write_text(json.dumps(_finite(report), indent=1))
    write_html(folder / "report.html", report)
    return report


def _finite(value: Any) -> Any:
    """NaN → None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _save_grid(folder: Path, index: int, panels: list[np.ndarray]) -> str:
    """Side-by-side PNG of equally sized RGB panels; returns its path relative to ``folder``."""
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    row: list[np.ndarray] = []
    for panel in panels:
        row += [panel, gap]
    name = f"images/{index:03d}.png"
    cv2.imwrite(str(folder / name), cv2.cvtColor(np.concatenate(row[:-1], axis=1), cv2.COLOR_RGB2BGR))
    return name
