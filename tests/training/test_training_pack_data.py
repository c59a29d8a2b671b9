"""The packed copy of a config's photographs: same split, same bytes, a size limit kept on record."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.training.helpers import tiny_config
from training.pack_data import PACK_FILE, main, pack_data
from training.sources import build_split


def _roles(config: object) -> list[tuple[str, list[str]]]:
    return [(r.key, r.roles) for r in build_split(config).records]  # type: ignore[arg-type]


def test_pack_holds_exactly_what_the_split_uses(tmp_path: Path, data_root: Path) -> None:
    data = tiny_config(tmp_path, data_root).data
    out = tmp_path / "pack"
    summary = pack_data(data, out)

    split = build_split(data)
    assert _roles(replace(data, root=str(out))) == _roles(data)
    assert summary["images"] == len(split.records) and summary["reencoded"] == []
    for record in split.records:
        for source in (record.image, record.vessel, record.fov):
            if source is not None:
                copy = out / Path(source).relative_to(data_root)
                assert copy.read_bytes() == Path(source).read_bytes()
    # Photographs no role needs stay behind (DeepDRiD's good half, the sets beyond the limit).
    packed = sorted(p.name for p in (out / "deepdrid" / "images").iterdir())
    assert packed == sorted(r.image.name for r in split.records if r.set == "deepdrid")
    assert len(packed) < len(list((data_root / "deepdrid" / "images").iterdir()))
    with (out / "deepdrid" / "quality.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(f"{row['stem']}.jpg" for row in rows) == [p for p in packed if p.endswith(".jpg")]
    assert (out / "splits.json").read_bytes() == (data_root / "splits.json").read_bytes()
    assert json.loads((out / PACK_FILE).read_text())["roles"] == split.counts()


def test_size_limit_reencodes_the_largest_photographs(tmp_path: Path, data_root: Path) -> None:
    data = tiny_config(tmp_path, data_root).data
    full = pack_data(data, tmp_path / "full")["bytes"]
    budget_mb = (full - 200_000) / 1e6
    summary = pack_data(data, tmp_path / "small", max_mb=budget_mb, reencode_quality=80)

    assert summary["bytes"] <= budget_mb * 1e6 < full
    assert summary["reencoded"], "nothing was re-encoded"
    for change in summary["reencoded"]:
        assert change["bytes_after"] < change["bytes_before"]
        assert change["psnr_db"] > 30.0
    assert summary["reencoded_psnr_db_min"] == min(c["psnr_db"] for c in summary["reencoded"])
    assert _roles(replace(data, root=str(tmp_path / "small"))) == _roles(data)
    with pytest.raises(ValueError, match="even with every JPEG re-encoded"):
        pack_data(data, tmp_path / "impossible", max_mb=0.01)
    assert not (tmp_path / "impossible").exists()


def test_refusals(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_config(tmp_path, data_root).data
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        pack_data(data, occupied)
    with pytest.raises(ValueError, match="outside the data root"):
        pack_data(replace(data, unlabeled_dirs=[str(tmp_path)]), tmp_path / "other")
    assert main(["--config", "no/such.yaml", "--out", str(tmp_path / "cli")]) == 2
    assert "config file not found" in capsys.readouterr().err
