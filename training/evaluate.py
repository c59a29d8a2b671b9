"""``fundus eval``: how much a weight artifact restores held-out fundus photographs.

Synthetic group (clean held-out images, e.g. the HRF test split), at two resolutions:

* **working size** (512²): the image is FOV-cropped to the working size, degraded with the Cofe-Net
  model at a fixed seed and restored by the network directly;
* **native**: the photograph at its own geometry is degraded there (as ``POST /degrade`` does) and
  restored through :mod:`model.restore`, the path ``POST /enhance`` takes (FOV detection, crop,
  network, transfer back to native resolution).

Reported inside the FOV: PSNR/SSIM of the degraded input, of a CLAHE baseline (LAB luminance) and of
the model; the same for the clean photograph itself through the model ("do no harm"); vessel
AUC/accuracy/IoU of the artifact's own vessel branch and AUC of an independent segmenter trained
only on clean photographs (:mod:`training.segmenter`, the paper's protocol) on clean, degraded,
CLAHE and enhanced copies, and the share of the clean-vs-degraded AUC gap the enhancement recovers.

Real group (real photographs with manual masks and no clean reference, e.g. the CHASE_DB1 test
split): vessel AUC/accuracy/IoU of the artifact's branch on the raw vs the enhanced photograph.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from model.artifact import load_artifact
from model.degradation import degrade_image
from model.device import select_device
from model.fov import FovNotFound, fov_mask, to_working
from model.fov_detect import detect_fov
from model.restore import enhanced_to_input, working_view
from training.do_no_harm import EnhanceFn, evaluate_good_photos, good_photo_paths
from training.metrics import image_tensor, psnr, ssim, uint8_image, vessel_metrics
from training.other_degradations import score_image, summarise_kinds
from training.prepare import make_working, read_mask, read_rgb
from training.report import write_html
from training.segmenter import load_segmenter
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


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _gap(clean: float, degraded: float, enhanced: float) -> float:
    """Share of the clean-vs-degraded gap recovered by the enhanced image."""
    gap = clean - degraded
    return float("nan") if abs(gap) < 1e-9 else (enhanced - degraded) / gap


Resolution = Literal["512", "native", "both"]
#: Vessel probability (S, S) float of a (3, S, S) float image on [0, 1].
SegmentFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class NativeCopy:
    """A photograph at its own geometry (long side capped) with its masks.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        fov: (H, W) bool: the dataset's FOV mask, else the detected circle.
        vessel: (H, W) uint8 {0, 1} manual mask, or None.
    """

    image: np.ndarray
    fov: np.ndarray
    vessel: np.ndarray | None


def native_copy(record: ImageRecord, max_side: int = 0) -> NativeCopy:
    """Read ``record`` at its own size, or scaled so its longer side is ``max_side`` (0 = as is)."""
    image = read_rgb(record.image)
    h, w = image.shape[:2]
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]

    def mask(path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        return cv2.resize(read_mask(path), (w, h), interpolation=cv2.INTER_NEAREST)

    fov = mask(record.fov)
    if fov is None:
        fov = fov_mask(h, w, detect_fov(image)).astype(np.uint8)
    return NativeCopy(image, fov > 0, mask(record.vessel))


def degrade_native(image: np.ndarray, seed: int, mode: str = "cofe", max_psnr: float = 50.0) -> np.ndarray:
    """Cofe-degrade (H, W, 3) uint8 at its own resolution, as ``POST /degrade`` does.

    The degradation's FOV is the circle detected on the photograph (zero outside it); draws that
    leave the image unchanged are skipped as in :func:`degrade_fixed`.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
    try:
        circle = fov_mask(*image.shape[:2], detect_fov(image)).astype(np.float32)
        fov = torch.from_numpy(circle)[None]
    except FovNotFound:
        fov = torch.ones(1, *image.shape[:2])
    degraded, _ = degrade_fixed(tensor, fov, seed, mode=mode, max_psnr=max_psnr)
    return uint8_image(degraded)


def restore_native(enhance: EnhanceFn, pixels: np.ndarray, working_size: int) -> np.ndarray:
    """(H, W, 3) uint8 photograph → enhanced (H, W, 3) uint8 through the service's path."""
    view = working_view(pixels, working_size)
    return enhanced_to_input(view, pixels, enhance(view.working))


def model_functions(model: Any, device: torch.device, stage: int = 0) -> tuple[EnhanceFn, SegmentFn]:
    """(enhance, segment) closures over a loaded MAGE-Net.

    ``enhance`` works on uint8 working images exactly like the service (uint8 in, rounded uint8 out).
    """

    def enhance(working: np.ndarray) -> np.ndarray:
        x = image_tensor(working)[None].to(device)
        with torch.inference_mode():
            out = model(x).images[stage][0].clamp(0, 1).float().cpu()
        return uint8_image(out)

    def segment(x: torch.Tensor) -> torch.Tensor:
        return model.vessels.predict(x[None].to(device))[0, 0].float().cpu()

    return enhance, segment


def independent_function(path: str | Path | None, device: torch.device) -> SegmentFn | None:
    """The independent segmenter's probability function, or None when no weights are given/found."""
    if not path or not Path(path).is_file():
        return None
    net = load_segmenter(path, device)

    def segment(x: torch.Tensor) -> torch.Tensor:
        return net.predict(x[None].to(device))[0, 0].float().cpu()

    return segment


def _image_scores(
    row: dict[str, Any], suffix: str, images: dict[str, np.ndarray], clean: np.ndarray, fov: np.ndarray
) -> None:
    """PSNR/SSIM of uint8 (H, W, 3) ``images`` against ``clean`` inside the bool ``fov``."""
    target, mask = image_tensor(clean), torch.from_numpy(fov.astype(np.float32))
    for name, image in images.items():
        row[f"{suffix}psnr_{name}"] = psnr(image_tensor(image), target, mask)
        row[f"{suffix}ssim_{name}"] = ssim(image_tensor(image), target, mask)


def _auc_scores(
    row: dict[str, Any],
    key: str,
    segment: SegmentFn,
    images: dict[str, np.ndarray],
    reference: torch.Tensor,
    fov: np.ndarray,
) -> None:
    """AUC of ``segment`` on each uint8 working image against ``reference`` → ``row[key_auc_name]``."""
    mask = torch.from_numpy(fov.astype(np.float32))
    for name, image in images.items():
        row[f"{key}_auc_{name}"] = vessel_metrics(segment(image_tensor(image)), reference, mask)["auc"]


def evaluate_working(
    clean: np.ndarray,
    fov: np.ndarray,
    vessel: np.ndarray | None,
    seed: int,
    *,
    enhance: EnhanceFn,
    segment: SegmentFn,
    independent: SegmentFn | None,
    mode: str = "cofe",
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Scores of one clean working image (S, S, 3) uint8 with FOV (S, S) {0,1} at the working size.

    Returns (row, image panels degraded | CLAHE | model | clean for the report grid).
    """
    row: dict[str, Any] = {}
    clean_t, fov_t = image_tensor(clean), torch.from_numpy(fov.astype(np.float32))
    degraded_t, row["seed"] = degrade_fixed(clean_t, fov_t, seed, mode=mode)
    degraded = uint8_image(degraded_t)
    variants = {
        "degraded": degraded,
        "clahe": clahe_baseline(degraded, fov),
        "model": enhance(degraded),
        "clean_model": enhance(clean),
    }
    _image_scores(row, "", variants, clean, fov > 0)
    clean_prob = segment(clean_t)
    reference = torch.from_numpy(vessel) if vessel is not None else (clean_prob >= 0.5).float()
    row["vessel_reference"] = "manual" if vessel is not None else "clean-image segmentation"
    named = {"clean": clean, "degraded": degraded, "clahe": variants["clahe"], "enhanced": variants["model"]}
    for name, image in named.items():
        prob = clean_prob if name == "clean" else segment(image_tensor(image))
        for key, value in vessel_metrics(prob, reference, fov_t).items():
            row[f"vessel_{key}_{name}"] = value
    if independent is not None and vessel is not None:
        _auc_scores(row, "indep", independent, named, torch.from_numpy(vessel), fov)
    return row, [degraded, variants["clahe"], variants["model"], clean]


def evaluate_native(
    photo: NativeCopy,
    seed: int,
    *,
    size: int,
    enhance: EnhanceFn,
    independent: SegmentFn | None,
    mode: str = "cofe",
) -> dict[str, Any]:
    """Scores of one photograph degraded and restored at its own geometry (the service's path)."""
    row: dict[str, Any] = {}
    degraded = degrade_native(photo.image, seed, mode)
    images = {
        "degraded": degraded,
        "clahe": clahe_baseline(degraded, photo.fov.astype(np.uint8)),
        "model": restore_native(enhance, degraded, size),
        "clean_model": restore_native(enhance, photo.image, size),
    }
    _image_scores(row, "native_", images, photo.image, photo.fov)
    if independent is not None and photo.vessel is not None:
        # The segmenter works at the working scale: every copy goes through the clean photo's crop.
        view = working_view(photo.image, size)
        warp = lambda a: to_working(a, view.crop)  # noqa: E731
        vessel = (warp(photo.vessel * 255) >= 128).astype(np.uint8)
        fov = (warp(photo.fov.astype(np.uint8) * 255) >= 128).astype(np.uint8)
        named = {
            "clean": photo.image,
            "degraded": degraded,
            "clahe": images["clahe"],
            "enhanced": images["model"],
        }
        _auc_scores(
            row,
            "native_indep",
            independent,
            {k: warp(v) for k, v in named.items()},
            torch.from_numpy(vessel),
            fov,
        )
    return row


def evaluate(
    weights: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    limit: int = 0,
    size: int = 512,
    device: str = "auto",
    mode: str = "cofe",
    resolution: Resolution = "both",
    native_max_side: int = 0,
    segmenter: str | Path | None = None,
    good_photos: Sequence[str | Path] = (),
    other_degradations: bool = False,
) -> dict[str, Any]:
    """Run the evaluation and write ``report.json``, ``report.html`` and ``images/``.

    ``good_photos``: files or folders of good photographs of the cameras in use; the report's
    ``good_photos`` section says how much the model changes them (:mod:`training.do_no_harm`).
    ``other_degradations``: also score the synthetic photographs under faults outside the training
    family at the working size (:mod:`training.other_degradations`; report section of that name).
    """
    if size <= 0 or size % 8:
        raise ValueError("--size must be a positive multiple of 8")
    if resolution not in ("512", "native", "both"):
        raise ValueError("--resolution must be 512, native or both")
    good_paths = good_photo_paths(good_photos) if good_photos else []
    started = time.monotonic()
    target = select_device(device)
    artifact = load_artifact(weights, target)
    stage = 1 if artifact.training.get("supervised_stages") == [1] else 0
    enhance, segment = model_functions(artifact.model, target, stage)
    independent = independent_function(segmenter, target)
    folder = Path(out)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = collect_images(data, limit)

    synthetic: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        record = item.record
        work = make_working(
            read_rgb(record.image),
            size,
            read_mask(record.vessel) if record.vessel else None,
            read_mask(record.fov) if record.fov else None,
        )
        row: dict[str, Any] = {"image": item.label, "group": item.group}
        if item.group == "real":
            enhanced = enhance(work.image)
            assert work.vessel is not None
            manual, fov = torch.from_numpy(work.vessel), torch.from_numpy(work.fov.astype(np.float32))
            for name, img in (("raw", work.image), ("enhanced", enhanced)):
                for key, value in vessel_metrics(segment(image_tensor(img)), manual, fov).items():
                    row[f"vessel_{key}_{name}"] = value
            row["grid"] = _save_grid(folder, index, [work.image, enhanced])
            real.append(row)
            continue
        seed = EVAL_SEED + index
        if other_degradations:
            other.append({"image": item.label, **score_image(work.image, work.fov, seed, enhance)})
        if resolution in ("512", "both"):
            scores, panels = evaluate_working(
                work.image,
                work.fov,
                work.vessel,
                seed,
                enhance=enhance,
                segment=segment,
                independent=independent,
                mode=mode,
            )
            row.update(scores)
            row["grid"] = _save_grid(folder, index, panels)
        if resolution in ("native", "both"):
            row.update(
                evaluate_native(
                    native_copy(record, native_max_side),
                    seed,
                    size=size,
                    enhance=enhance,
                    independent=independent,
                    mode=mode,
                )
            )
        synthetic.append(row)
        log.info("eval %d/%d: %s", index + 1, len(items), item.label)

    summary = summarise(synthetic, real)
    good = None
    if good_paths:
        good = evaluate_good_photos(
            good_paths, enhance, size, lambda index, panels: _save_grid(folder, index, panels, "good")
        )
        overall = good["summary"]["all"]
        summary["good_photos"] = overall["photos"]
        for key in ("psnr_working", "psnr_native"):
            summary[f"good_{key}_worst"] = overall[f"{key}_worst"]
            summary[f"good_{key}_median"] = overall[f"{key}_median"]
    other_report = None
    if other_degradations:
        kinds = summarise_kinds(other)
        other_report = {"kinds": kinds, "images": other}
        for kind, scores in kinds.items():
            summary[f"other_{kind}_psnr_gain"] = scores["psnr_gain_mean"]
            summary[f"other_{kind}_harmed"] = scores["harmed"]
    report = {
        "weights": str(weights),
        "version": artifact.version,
        "preset": artifact.preset,
        "data": str(data),
        "size": size,
        "resolution": resolution,
        "native_max_side": native_max_side,
        "independent_segmenter": str(segmenter) if independent is not None else None,
        "degradation_mode": mode,
        "seed_base": EVAL_SEED,
        "device": str(target),
        "wall_time_s": round(time.monotonic() - started, 1),
        "summary": summary,
        "synthetic": synthetic,
        "real": real,
        "good_photos": good,
        "other_degradations": other_report,
    }
    (folder / "report.json").write_text(json.dumps(_finite(report), indent=1))
    write_html(folder / "report.html", report)
    return report


def summarise(synthetic: list[dict[str, Any]], real: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images, gains over the baselines and recovered vessel-AUC gaps."""
    summary: dict[str, Any] = {"synthetic_images": len(synthetic), "real_images": len(real)}
    for prefix in ("", "native_"):
        for name in ("degraded", "clahe", "model", "clean_model"):
            summary[f"{prefix}psnr_{name}"] = _mean(synthetic, f"{prefix}psnr_{name}")
            summary[f"{prefix}ssim_{name}"] = _mean(synthetic, f"{prefix}ssim_{name}")
        summary[f"{prefix}psnr_gain_vs_degraded"] = (
            summary[f"{prefix}psnr_model"] - summary[f"{prefix}psnr_degraded"]
        )
        summary[f"{prefix}psnr_gain_vs_clahe"] = (
            summary[f"{prefix}psnr_model"] - summary[f"{prefix}psnr_clahe"]
        )
        key = f"{prefix}indep_auc"
        for name in ("clean", "degraded", "clahe", "enhanced"):
            summary[f"{key}_{name}"] = _mean(synthetic, f"{key}_{name}")
        summary[f"{key}_gap_recovered"] = _gap(
            summary[f"{key}_clean"], summary[f"{key}_degraded"], summary[f"{key}_enhanced"]
        )
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
    return summary


def _finite(value: Any) -> Any:
    """NaN → None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _save_grid(folder: Path, index: int, panels: list[np.ndarray], prefix: str = "") -> str:
    """Side-by-side PNG of equally sized RGB panels; returns its path relative to ``folder``."""
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    row: list[np.ndarray] = []
    for panel in panels:
        row += [panel, gap]
    name = f"images/{prefix}{index:03d}.png"
    cv2.imwrite(str(folder / name), cv2.cvtColor(np.concatenate(row[:-1], axis=1), cv2.COLOR_RGB2BGR))
    return name
