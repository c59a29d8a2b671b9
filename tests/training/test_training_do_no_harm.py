"""Do no harm on good photographs: ``fundus eval --good-photos`` reports how much the model changes
photographs that need no enhancement, per camera, at the working size and through the restore path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.cli import main
from training.do_no_harm import camera_of, evaluate_good_photos, good_photo_paths
from training.model_card import tables


@pytest.fixture
def cameras(tmp_path: Path, data_root: Path) -> Path:
    """Two small real photographs in ``<tmp>/cams/deepdrid/images`` and one in ``<tmp>/cams/idrid``."""
    root = tmp_path / "cams"
    (root / "deepdrid" / "images").mkdir(parents=True)
    (root / "idrid").mkdir()
    for source in sorted((data_root / "deepdrid" / "images").iterdir())[:2]:
        shutil.copy(source, root / "deepdrid" / "images" / source.name)
    idrid = sorted((data_root / "idrid" / "images").iterdir())[0]
    shutil.copy(idrid, root / "idrid" / idrid.name)
    return root


def test_paths_folders_and_cameras(cameras: Path) -> None:
    paths = good_photo_paths([cameras / "deepdrid" / "images", *sorted((cameras / "idrid").iterdir())])
    assert len(paths) == 3
    assert [camera_of(p) for p in paths] == ["deepdrid", "deepdrid", "idrid"]
    with pytest.raises(ValueError, match="does not exist"):
        good_photo_paths([cameras / "missing"])
    (cameras / "empty").mkdir()
    with pytest.raises(ValueError, match="no images directly in"):
        good_photo_paths([cameras / "empty", cameras / "idrid"])
    with pytest.raises(ValueError, match="no images given"):
        good_photo_paths([])


def test_identity_is_left_alone_and_a_changed_camera_is_the_worst(cameras: Path) -> None:
    paths = good_photo_paths([cameras / "deepdrid" / "images", cameras / "idrid"])
    untouched = evaluate_good_photos(paths, lambda image: image, 64)["summary"]
    assert untouched["all"]["psnr_working_worst"] == 100.0 and untouched["all"]["psnr_native_worst"] >= 45
    assert untouched["all"]["psnr_working_left_alone"] == 1.0

    calls: list[int] = []

    def darken_idrid(image: np.ndarray) -> np.ndarray:
        # Stands in for a model that alters one camera's photographs: the third (IDRiD) one.
        calls.append(1)
        return (image // 2).astype(np.uint8) if len(calls) == 3 else image

    report = evaluate_good_photos(paths, darken_idrid, 64)
    summary = report["summary"]
    assert summary["cameras"]["deepdrid"]["psnr_working_worst"] == 100.0
    idrid = summary["cameras"]["idrid"]
    assert idrid["psnr_working_worst"] < 20 and idrid["psnr_native_worst"] < 20
    assert idrid["psnr_working_left_alone"] == 0.0
    assert summary["all"]["psnr_working_worst"] == idrid["psnr_working_worst"]
    assert summary["all"]["psnr_working_median"] == 100.0  # two of three untouched


def test_eval_cli_reports_good_photos_and_the_card_row(
    tmp_path: Path, data_root: Path, tiny_artifact: Path, cameras: Path
) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(tiny_artifact), "--data", str(data_root), "--out", str(out)]
    fast = ["--limit", "1", "--size", "64", "--device", "cpu", "--resolution", "512"]
    assert main([*args, *fast, "--good-photos", str(cameras / "deepdrid"), str(cameras / "idrid")]) == 2
    assert (
        main([*args, *fast, "--good-photos", str(cameras / "deepdrid" / "images"), str(cameras / "idrid")])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert len(report["good_photos"]["photos"]) == 3
    assert set(report["good_photos"]["summary"]["cameras"]) == {"deepdrid", "idrid"}
    summary = report["summary"]
    assert summary["good_photos"] == 3 and 0 < summary["good_psnr_working_worst"] <= 100
    assert "worst good photograph" in tables(report)
    page = (out / "report.html").read_text()
    assert "Good photographs through the model" in page and "idrid" in page
    assert len(list((out / "images").glob("good*.png"))) == 3
    assert all((out / row["grid"]).is_file() for row in report["good_photos"]["photos"])
    plain = tmp_path / "plain"
    assert main([*args[:-1], str(plain), *fast]) == 0
    assert "worst good photograph" not in tables(json.loads((plain / "report.json").read_text()))
