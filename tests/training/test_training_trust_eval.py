"""``fundus eval-trust``: grades, uncertainty-vs-error correlation, structure figures on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.quality import QualityNet, save_quality
from training.cli import main
from training.evaluate_trust import spearman, summarise_trust


def test_spearman_matches_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [1, 100, 2, 3, 4]) == pytest.approx(0.4)  # ranks, not values
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9487, abs=1e-4)  # ties averaged
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_summary_counts_the_pairs_it_is_given() -> None:
    rows = [
        {
            "p_clean": 0.9,
            "p_degraded": 0.2,
            "p_enhanced": 0.6,
            "error": 0.1,
            "stage_uncertainty": 0.02,
            "flip_uncertainty": 0.01,
            "dice": 0.9,
        },
        {
            "p_clean": 0.8,
            "p_degraded": 0.85,
            "p_enhanced": 0.5,
            "error": 0.2,
            "stage_uncertainty": 0.03,
            "flip_uncertainty": 0.02,
            "dice": 0.65,
        },
        {
            "p_clean": 0.7,
            "p_degraded": 0.1,
            "p_enhanced": 0.3,
            "error": 0.3,
            "stage_uncertainty": 0.05,
            "flip_uncertainty": 0.01,
            "dice": 0.75,
        },
    ]
    summary = summarise_trust(rows, [{"p_before": 0.2, "p_after": 0.4}])
    assert summary["degraded_graded_worse"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["enhanced_graded_better"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["spearman_stage_uncertainty_vs_error"] == pytest.approx(1.0)
    assert summary["warning_rate"]["0.7"] == pytest.approx(1 / 3, abs=1e-4)
    assert summary["real"]["enhanced_graded_better"] == 1.0


def test_eval_trust_command_writes_the_report(
    tmp_path: Path, data_root: Path, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grader = tmp_path / "q.safetensors"
    torch.manual_seed(0)
    save_quality(grader, QualityNet(width=4), 1.0, {})
    args = [
        "eval-trust",
        "--weights",
        str(tiny_artifact),
        "--quality",
        str(grader),
        "--data",
        str(data_root),
        "--out",
        str(tmp_path / "trust"),
        "--seeds",
        "2",
        "--limit",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "trust" / "trust.json").read_text())
    assert summary["pairs"] == 2 == len(report["synthetic"])
    assert len(report["real"]) == 1
    row = report["synthetic"][0]
    assert 0 <= row["p_degraded"] <= 1 and row["error"] > 0 and 0 <= row["dice"] <= 1
    assert row["stage_uncertainty"] >= 0 and row["flip_uncertainty"] >= 0
