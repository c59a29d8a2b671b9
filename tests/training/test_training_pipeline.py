"""``fundus train all``: every phase from one config, then the evaluation and model-card tables;
run again, it skips what is done and resumes what was interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.training.helpers import SMOKE
from training.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def _config(tmp: Path, data_root: Path) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["run"]["out_root"] = str(tmp / "runs")
    raw["data"].update(
        root=str(data_root), cache_dir=str(tmp / "cache"), limit_per_set=2, val_native_max_side=96
    )
    raw["logging"].update(tensorboard=False, progress=False, val_every=2, checkpoint_every=2)
    raw["rsp"]["steps"] = 3
    raw["segmenter"] = {"steps": 2, "batch_size": 2, "width": 4}
    raw["enhance"]["steps"] = 4
    path = tmp / "all.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_all_phases_then_eval_and_tables(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, data_root)
    args = ["train", "all", "--config", str(config), "--eval-limit", "1", "--native-max-side", "128"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "runs" / "smoke"
    assert summary["finished"] and set(summary["phases"]) == {"rsp", "pseudo-masks", "segmenter", "enhance"}
    for product in ("rsp/rsp.safetensors", "segmenter/segmenter.safetensors", "enhance/teacher.safetensors"):
        assert (run / product).is_file(), product
    tables = (run / "eval" / "model-card-tables.md").read_text()
    assert "at native resolution through `restore`" in tables and "independent segmenter" in tables
    # Do no harm is checked on the run's held-out good photographs, never on the test split.
    report = json.loads((run / "eval" / "report.json").read_text())
    good = [Path(p["image"]).stem for p in report["good_photos"]["photos"]]
    roles = (run / "enhance" / "roles.csv").read_text().splitlines()
    assert good and all(any(f",{stem},val," in row for row in roles) for stem in good)
    assert "worst good photograph" in tables
    # Faults outside the training family are scored on the synthetic photographs and tabled.
    other = report["other_degradations"]
    assert len(other["images"]) == report["summary"]["synthetic_images"] == 1
    assert set(other["kinds"]) == {"defocus", "motion", "jpeg", "noise", "underexposure", "veil"}
    assert "| defocus |" in tables and "photographs made worse" in tables
    assert json.loads((run / "pipeline.json").read_text())["finished"]
    # A second call finds every product and only re-evaluates.
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(p.get("skipped") for name, p in again["phases"].items() if name != "pseudo-masks")


def test_all_resumes_an_interrupted_phase(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, data_root)
    assert main(["train", "rsp", "--config", str(config), "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert (
        main(["train", "all", "--config", str(config), "--eval-limit", "1", "--native-max-side", "128"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["phases"]["rsp"]["steps"] == 3 and not summary["phases"]["rsp"].get("skipped")


def test_shipped_configs_are_valid() -> None:
    from training.config import load_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        assert config.enhance.steps > 0, path.name
    gpu = load_config(CONFIGS / "gpu.yaml")
    assert gpu.run.device == "auto" and gpu.run.amp and gpu.enhance.loss.vessel_anchor == "frozen"
