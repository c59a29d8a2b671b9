"""All three phases through the CLI, an artifact that `fundus info` reads, and `fundus eval`."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.training.helpers import SMOKE
from training.cli import main


def _smoke_file(tmp: Path, data_root: Path) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["run"]["out_root"] = str(tmp / "runs")
    raw["data"].update(root=str(data_root), cache_dir=str(tmp / "cache"), limit_per_set=2)
    raw["logging"]["tensorboard"] = True
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_three_phases_write_an_artifact_info_can_read(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _smoke_file(tmp_path, data_root)
    fast = ["--set", "rsp.steps=3", "--set", "enhance.steps=3"]
    assert main(["train", "rsp", "--config", str(config), *fast]) == 0
    assert main(["train", "pseudo-masks", "--config", str(config), *fast]) == 0
    assert main(["train", "enhance", "--config", str(config), *fast]) == 0
    runs = tmp_path / "runs" / "smoke"
    assert (runs / "rsp" / "rsp.safetensors").is_file()
    assert list((runs / "pseudo-masks").rglob("*.png"))
    enhance = runs / "enhance"
    for name in ("config.yaml", "roles.csv", "split.json", "log.csv", "checkpoint.pt"):
        assert (enhance / name).is_file(), name
    assert list((enhance / "tb").iterdir())
    with (enhance / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows if r["loss/total"]] == ["1", "3"]
    assert rows[-1]["val/psnr"] and float(rows[-1]["val/psnr_input"]) < 50  # the validation curve
    capsys.readouterr()
    # Resume from the folder alone (its saved config) and extend the run by one step.
    assert main(["train", "enhance", "--resume", str(enhance), "--set", "enhance.steps=4"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["steps"] == 4 and resumed["resumes"] == 1 and resumed["finished"]

    from service.commands.info import run as info

    namespace = argparse.Namespace(
        preset=None, weights=str(enhance / "teacher.safetensors"), json=True, size=512
    )
    assert info(namespace) == 0
    described = json.loads(capsys.readouterr().out)
    training = described["training"]
    assert described["preset"] == "tiny"
    assert training["steps"] == 4 and training["resumes"] == 1 and training["mean_teacher"] is True
    assert training["data_roles"]["unlabeled"]["deepdrid"] == 2
    assert training["config"]["model"]["preset"] == "tiny"
    assert {"device", "cpu_count"} <= set(training["hardware"])
    assert training["rsp"]["steps"] == 3


def test_bad_config_key_is_a_clear_error(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _smoke_file(tmp_path, data_root)
    assert main(["train", "rsp", "--config", str(config), "--set", "rsp.stepz=3"]) == 2
    assert "rsp.stepz" in capsys.readouterr().err


def test_eval_on_two_images_writes_json_and_html(
    tmp_path: Path, data_root: Path, tiny_artifact: Path
) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(tiny_artifact), "--data", str(data_root), "--out", str(out)]
    assert main([*args, "--limit", "1", "--size", "64", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["synthetic_images"] == 1 and summary["real_images"] == 1
    for key in (
        "psnr_degraded",
        "psnr_clahe",
        "psnr_model",
        "ssim_degraded",
        "ssim_clahe",
        "ssim_model",
        "vessel_auc_clean",
        "vessel_auc_degraded",
        "vessel_auc_enhanced",
        "vessel_auc_gap_recovered",
        "vessel_iou_enhanced",
        "vessel_acc_enhanced",
        "real_vessel_auc_raw",
        "real_vessel_auc_enhanced",
    ):
        assert key in summary, key
    assert summary["psnr_degraded"] is None or summary["psnr_degraded"] > 10
    html = (out / "report.html").read_text()
    assert "<table>" in html and "CLAHE" in html
    assert len(list((out / "images").glob("*.png"))) == 2


def test_eval_native_resolution_and_independent_segmenter(
    tmp_path: Path, data_root: Path, tiny_artifact: Path
) -> None:
    from training.segmenter import SegmenterNet, save_segmenter

    segmenter = tmp_path / "segmenter.safetensors"
    save_segmenter(segmenter, SegmenterNet(4), {"note": "random"})
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(tiny_artifact), "--data", str(data_root), "--out", str(out)]
    extra = ["--native-max-side", "160", "--segmenter", str(segmenter), "--resolution", "both"]
    assert main([*args, "--limit", "1", "--size", "64", "--device", "cpu", *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    summary, row = report["summary"], report["synthetic"][0]
    for prefix in ("", "native_"):
        for key in ("psnr_degraded", "psnr_model", "psnr_clahe", "psnr_clean_model"):
            assert summary[f"{prefix}{key}"] is not None and summary[f"{prefix}{key}"] > 5, prefix + key
        assert 0 < summary[f"{prefix}ssim_model"] <= 1
        for name in ("clean", "degraded", "enhanced"):
            assert 0 <= summary[f"{prefix}indep_auc_{name}"] <= 1
    assert "native_psnr_gain_vs_degraded" in summary and "psnr_gain_vs_clahe" in summary
    assert report["independent_segmenter"] == str(segmenter)
    assert row["native_psnr_degraded"] != row["psnr_degraded"]  # a different (native) degradation
    only_native = tmp_path / "native"
    args = ["eval", "--weights", str(tiny_artifact), "--data", str(data_root), "--out", str(only_native)]
    assert (
        main(
            [
                *args,
                "--limit",
                "1",
                "--size",
                "64",
                "--device",
                "cpu",
                "--resolution",
                "native",
                "--native-max-side",
                "160",
            ]
        )
        == 0
    )
    native = json.loads((only_native / "report.json").read_text())["summary"]
    assert native["psnr_model"] is None and native["native_psnr_model"] > 5
