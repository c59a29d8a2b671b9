"""EyeQ label CSV, plain unlabeled folders and the limit/validation draw on synthetic folders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from training.config import DataConfig
from training.sources import build_split


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))


def test_eyeq_and_plain_folders_get_their_roles(tmp_path: Path) -> None:
    eyeq = tmp_path / "eyeq"
    for name in ("1_left", "2_left", "3_right", "4_right", "5_left"):
        _image(eyeq / f"{name}.png")  # preprocessed copies are PNG, the CSV names JPEGs
    (tmp_path / "Label_EyeQ_train.csv").write_text(
        ",image,quality,DR_grade\n0,1_left.jpeg,0,0\n1,2_left.jpeg,0,1\n2,3_right.jpeg,1,0\n"
        "3,4_right.jpeg,2,0\n4,5_left.jpeg,0,2\n5,missing.jpeg,0,0\n"
    )
    real = tmp_path / "real"
    _image(real / "a.jpg")
    _image(real / "b.png")
    config = DataConfig(
        root=str(tmp_path / "none"),
        clean_sets=[],
        vessel_sets=[],
        unlabeled_sets=[],
        quality_sets=[],
        eyeq_images=str(eyeq),
        eyeq_csv=str(tmp_path / "Label_EyeQ_train.csv"),
        unlabeled_dirs=[str(real)],
        val_fraction=0.3,
    )
    split = build_split(config)
    roles = {r.key: r.roles for r in split.records}
    assert roles["eyeq/3_right"] == ["unlabeled"]
    assert "eyeq/4_right" not in roles  # Reject is unused
    good = [roles[f"eyeq/{n}"] for n in ("1_left", "2_left", "5_left")]
    assert sorted(map(tuple, good)) == [("clean", "pseudo"), ("clean", "pseudo"), ("val",)]
    assert roles["dir:real/a"] == ["unlabeled"] and roles["dir:real/b"] == ["unlabeled"]
    assert [(r.key, r.roles) for r in build_split(config).records] == [
        (r.key, r.roles) for r in split.records
    ]
