"""``fundus train quality``: the grader trains on the pack's quality labels split by patient, and its
file loads back into the service's grader with the report's version and temperature."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from model.quality import QUALITY_SIZE, QualityNet, fit_temperature, load_quality, save_quality
from tests.training.helpers import tiny_config
from training.cli import main
from training.phase_quality import _patient_split


def test_patient_split_keeps_each_patient_in_one_role() -> None:
    rows = [{"patient_id": str(p), "stem": f"{p}_{eye}"} for p in range(40) for eye in ("l", "r")]
    roles = _patient_split(rows, seed=0, val=0.15, test=0.15)
    assert set(roles.values()) == {"train", "val", "test"}
    assert sum(r == "test" for r in roles.values()) == 6
    assert _patient_split(rows, seed=0, val=0.15, test=0.15) == roles
    assert _patient_split(rows, seed=1, val=0.15, test=0.15) != roles


def test_train_quality_writes_a_loadable_grader(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, data_root, ["quality.epochs=2", "quality.batch_size=4", "quality.width=4"])
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "quality", "--config", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((Path(summary["weights"]).parent / "report.json").read_text())
    assert report["data"]["photographs"]["train"] > 0
    assert {"roc_auc", "accuracy", "ece_raw", "ece_calibrated"} <= set(report["held_out"])
    assert report["pairs"]["pairs"] > 0 and 0.0 <= report["pairs"]["degraded_graded_worse"] <= 1.0
    assert len(report["history"]) == 2
    grader = load_quality(summary["weights"])
    assert grader.version == report["version"]
    assert grader.temperature == pytest.approx(report["temperature"], abs=1e-3)
    grade = grader.grade(np.full((64, 64, 3), 90, dtype=np.uint8))
    assert grade.grade in ("good", "poor") and sum(grade.probabilities.values()) == pytest.approx(
        1.0, abs=1e-3
    )


def test_temperature_fit_undoes_overconfidence() -> None:
    torch.manual_seed(0)
    calibrated = torch.randn(4000) * 2.0  # logits of a calibrated model: labels drawn from them ...
    labels = (torch.rand(4000) < torch.sigmoid(calibrated)).float()
    temperature = fit_temperature(calibrated * 4.0, labels)  # ... made 4× overconfident
    assert temperature == pytest.approx(4.0, rel=0.15)


def test_grader_round_trip_and_refusals(tmp_path: Path, tiny_artifact: Path) -> None:
    net = QualityNet(width=4)
    version = save_quality(tmp_path / "q.safetensors", net, 1.5, {"note": "test"})
    loaded = load_quality(tmp_path / "q.safetensors")
    assert loaded.version == version and loaded.temperature == 1.5
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    resized = cv2.resize(image, (QUALITY_SIZE, QUALITY_SIZE), interpolation=cv2.INTER_AREA)
    net.eval()
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255.0) / 1.5)
    assert loaded.probabilities(image[None])[0] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="not a quality model"):
        load_quality(tiny_artifact)
    with pytest.raises(FileNotFoundError):
        load_quality(tmp_path / "missing.safetensors")
