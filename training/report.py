"""HTML report of ``fundus eval``: a metrics table and side-by-side image grids (self-contained page)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

SYNTHETIC_COLUMNS = ("degraded", "clahe", "model")
VESSEL_COLUMNS = ("clean", "degraded", "clahe", "enhanced")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_rows(s: dict[str, Any], prefix: str) -> list[list[str]]:
    return [
        [
            "PSNR (dB, in FOV)",
            *[_fmt(s.get(f"{prefix}psnr_{c}"), 2) for c in SYNTHETIC_COLUMNS],
            _fmt(s.get(f"{prefix}psnr_clean_model"), 2),
        ],
        [
            "SSIM (in FOV)",
            *[_fmt(s.get(f"{prefix}ssim_{c}")) for c in SYNTHETIC_COLUMNS],
            _fmt(s.get(f"{prefix}ssim_clean_model")),
        ],
        [
            "independent vessel AUC",
            *[_fmt(s.get(f"{prefix}indep_auc_{c}")) for c in ("degraded", "clahe", "enhanced")],
            _fmt(s.get(f"{prefix}indep_auc_clean")),
        ],
    ]


def write_html(path: Path, report: dict[str, Any]) -> None:
    """Write the report page for an :func:`training.evaluate.evaluate` result."""
    s = report["summary"]
    header = ["metric", "degraded input", "CLAHE (LAB L)", "model", "clean photo through the model"]
    vessel_rows = [
        [
            key.upper(),
            *[_fmt(s[f"vessel_{key}_{c}"]) for c in VESSEL_COLUMNS],
            _fmt(s[f"vessel_{key}_gap_recovered"], 3),
        ]
        for key in ("auc", "acc", "iou")
    ]
    real_rows = [
        [key.upper(), _fmt(s[f"real_vessel_{key}_raw"]), _fmt(s[f"real_vessel_{key}_enhanced"])]
        for key in ("auc", "acc", "iou")
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fundus-enhance evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:100%}"
        "figure{margin:1em 0}</style></head><body>",
        "<h1>fundus-enhance evaluation</h1>",
        f"<p>weights <code>{html.escape(str(report['version']))}</code> "
        f"(preset {html.escape(str(report['preset']))}), "
        f"working size {report['size']}, degradation mode {html.escape(str(report['degradation_mode']))}, "
        f"seeds from {report['seed_base']}, device {html.escape(str(report['device']))}.</p>",
        f"<h2>Synthetic degradations at the working size ({s['synthetic_images']} images)</h2>",
        _table(header, _image_rows(s, "")),
        "<h2>Synthetic degradations at native resolution, through the service's restore path</h2>",
        _table(header, _image_rows(s, "native_")),
        "<h3>Vessel segmentation (the artifact's vessel branch, working size)</h3>",
        _table(["metric", *VESSEL_COLUMNS, "gap recovered"], vessel_rows),
        f"<h2>Real images ({s['real_images']} images, no clean reference)</h2>",
        _table(["metric", "raw", "enhanced"], real_rows),
        "<h2>Images</h2><p>Synthetic rows: degraded | CLAHE | model | clean (working size). "
        "Real rows: raw | enhanced. Good photographs: input | answer (working size).</p>",
    ]
    good = report.get("good_photos")
    if good:
        parts.insert(-1, _good_photos_section(good))
    for row in report["synthetic"] + report["real"] + (good["photos"] if good else []):
        if "grid" not in row:
            continue
        if "camera" in row:
            caption = (
                f"good photograph {row['image']}: input | answer, PSNR vs itself "
                f"{_fmt(row['psnr_working'], 2)} dB (512²), {_fmt(row['psnr_native'], 2)} dB (native)"
            )
        elif row["group"] == "synthetic":
            caption = (
                f"{row['image']}: PSNR {_fmt(row.get('psnr_degraded'), 2)} | "
                f"{_fmt(row.get('psnr_clahe'), 2)} | {_fmt(row.get('psnr_model'), 2)} dB"
            )
        else:
            caption = (
                f"{row['image']}: vessel AUC raw {_fmt(row['vessel_auc_raw'])}, "
                f"enhanced {_fmt(row['vessel_auc_enhanced'])}"
            )
        parts.append(
            f"<figure><img src='{html.escape(row['grid'])}' alt=''><figcaption>{html.escape(caption)}"
            "</figcaption></figure>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def _good_photos_section(good: dict[str, Any]) -> str:
    """The do-no-harm table: per camera, how close good photographs stay to themselves."""
    summary = good["summary"]
    rows = [
        [
            html.escape(name),
            str(stats["photos"]),
            f"{_fmt(stats['psnr_working_worst'], 2)} / {_fmt(stats['psnr_working_median'], 2)}",
            f"{_fmt(stats['psnr_native_worst'], 2)} / {_fmt(stats['psnr_native_median'], 2)}",
            _fmt(stats["psnr_working_left_alone"], 2),
        ]
        for name, stats in [*summary["cameras"].items(), ("all", summary["all"])]
    ]
    header = ["camera", "photos", "512²: worst / median dB", "native: worst / median dB", "left alone"]
    title = f"<h2>Good photographs through the model (left alone: ≥ {summary['left_alone_db']:g} dB)</h2>"
    return title + _table(header, rows)
