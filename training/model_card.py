"""The model card's result tables, generated from a ``fundus eval`` report.

One table puts the working-size (512²) and native-resolution figures side by side with the quality
targets the weights are held to; a second lists the underlying means. Both are Markdown, ready to
paste into ``model/weights/MODEL_CARD.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: (row label, 512² value key, native value key, 512² target, native target); higher is better.
TARGETS: tuple[tuple[str, str | None, str | None, float | None, float | None], ...] = (
    ("PSNR gain over the degraded input (dB)", "psnr_gain_vs_degraded", "native_psnr_gain_vs_degraded",
     5.0, 4.0),
    ("PSNR gain over CLAHE (dB)", "psnr_gain_vs_clahe", "native_psnr_gain_vs_clahe", 4.0, 3.0),
    ("SSIM", "ssim_model", "native_ssim_model", 0.93, 0.90),
    ("vessel AUC gap recovered, own RSP branch", "vessel_auc_gap_recovered", None, 0.70, None),
    ("vessel AUC gap recovered, independent segmenter", "indep_auc_gap_recovered",
     "native_indep_auc_gap_recovered", 0.60, 0.50),
    ("clean photograph through the model (PSNR vs itself, dB)", "psnr_clean_model", "native_psnr_clean_model",
     30.0, 30.0),
    ("worst good photograph of `--good-photos` through the model (PSNR vs itself, dB)",
     "good_psnr_working_worst", "good_psnr_native_worst", 30.0, 30.0),
    ("real CHASE_DB1 vessel AUC, raw photograph", "real_vessel_auc_raw", None, None, None),
    ("real CHASE_DB1 vessel IoU at 0.5, raw photograph", "real_vessel_iou_raw", None, None, None),
)  # fmt: skip


def _cell(summary: dict[str, Any], key: str | None, target: float | None) -> str:
    if key is None:
        return "—"
    value = summary.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}" if abs(value) < 2 else f"{value:.2f}"
    if target is None:
        return text
    return f"{text} ({'met' if value >= target else 'not met'}: ≥ {target:g})"


def tables(report: dict[str, Any]) -> str:
    """Markdown: targets at both resolutions, then the means behind them."""
    s = report["summary"]
    lines = [
        f"Weights `{report['version']}` ({report['preset']}), `fundus eval` on `{report['data']}` "
        f"({s['synthetic_images']} synthetic pairs, Cofe `{report['degradation_mode']}` degradations at "
        f"seeds from {report['seed_base']}, {s['real_images']} real photographs), in the FOV.",
        "",
        "| | at 512² | at native resolution through `restore` |",
        "|---|---|---|",
    ]
    for label, key_512, key_native, target_512, target_native in TARGETS:
        if key_512 not in s and key_native not in s:
            continue  # a part this evaluation did not run (e.g. no --good-photos)
        lines.append(f"| {label} | {_cell(s, key_512, target_512)} | {_cell(s, key_native, target_native)} |")
    lines += [
        "",
        "| means | degraded | CLAHE | model | clean photo through the model |",
        "|---|---|---|---|---|",
    ]
    for prefix, name in (("", "512²"), ("native_", "native")):
        for metric in ("psnr", "ssim"):
            cells = [
                _cell(s, f"{prefix}{metric}_{v}", None) for v in ("degraded", "clahe", "model", "clean_model")
            ]
            lines.append(f"| {metric.upper()} {name} | {' | '.join(cells)} |")
        cells = [_cell(s, f"{prefix}indep_auc_{v}", None) for v in ("degraded", "clahe", "enhanced", "clean")]
        lines.append(f"| independent vessel AUC {name} | {' | '.join(cells)} |")
    cells = [_cell(s, f"vessel_auc_{v}", None) for v in ("degraded", "clahe", "enhanced", "clean")]
    lines.append(f"| own-branch vessel AUC 512² | {' | '.join(cells)} |")
    lines.append(
        f"| real CHASE_DB1 vessel AUC raw → enhanced | {_cell(s, 'real_vessel_auc_raw', None)} | | "
        f"{_cell(s, 'real_vessel_auc_enhanced', None)} | |"
    )
    lines += _other_degradations(report.get("other_degradations"))
    return "\n".join(lines) + "\n"


def _other_degradations(section: dict[str, Any] | None) -> list[str]:
    """Markdown rows for the faults outside the training family (empty when not evaluated)."""
    if not section:
        return []
    lines = [
        "",
        "| fault outside the training family (512²) | PSNR degraded → model (dB) | gain mean / worst (dB) "
        "| SSIM degraded → model | photographs made worse |",
        "|---|---|---|---|---|",
    ]
    for kind, k in section["kinds"].items():
        lines.append(
            f"| {kind} | {k['psnr_degraded']:.2f} → {k['psnr_model']:.2f} | {k['psnr_gain_mean']:+.2f} / "
            f"{k['psnr_gain_worst']:+.2f} | {k['ssim_degraded']:.3f} → {k['ssim_model']:.3f} "
            f"| {k['harmed']} of {k['photos']} |"
        )
    return lines


def write_tables(report: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`tables` of ``report`` to ``path``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(tables(report))
    return target
