"""Exact resume: N steps + checkpoint + resume + N steps equals 2N uninterrupted steps."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.training.helpers import tiny_config
from training.checkpoint import load_checkpoint
from training.phase_enhance import train_enhance
from training.phase_rsp import train_rsp


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return [row[:1] + row[2:] for row in csv.reader(handle)]  # drop the wall-clock column


def test_enhance_resume_is_exact(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    train_rsp(config)  # vessel weights for the enhance phase
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    done = train_enhance(config, run_dir=str(straight))
    assert done["finished"] and done["steps"] == 4
    first = train_enhance(config, run_dir=str(split), stop_at=2)
    assert not first["finished"] and first["steps"] == 2
    assert not (split / "teacher.safetensors").exists()
    second = train_enhance(config, resume=str(split))
    assert second["finished"] and second["steps"] == 4 and second["resumes"] == 1
    a = load_checkpoint(straight)["task"]
    b = load_checkpoint(split)["task"]
    for part in ("student", "teacher"):
        for name, value in a[part].items():
            assert torch.allclose(value, b[part][name], atol=1e-6, rtol=0), f"{part}.{name}"
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert _rows(straight / "log.csv") == _rows(split / "log.csv")


def test_resume_refuses_a_checkpoint_of_another_phase(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    summary = train_rsp(config, stop_at=1)
    with pytest.raises(ValueError, match="rsp"):
        train_enhance(config, resume=summary["run_dir"])


def test_max_minutes_checkpoints_and_stops(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    summary = train_rsp(config, max_minutes=1e-9)
    assert summary["steps"] == 1 and not summary["finished"]
    assert load_checkpoint(summary["run_dir"])["step"] == 1
    resumed = train_rsp(config, resume=summary["run_dir"])
    assert resumed["finished"] and Path(resumed["weights"]).is_file()


def test_resumed_log_keeps_its_rows_when_scalars_are_added(tmp_path: Path) -> None:
    from training.runtime import RunLogger

    old = RunLogger(tmp_path, ["loss/a"], tensorboard=False)
    for step in (1, 2, 3):
        old.log(step, 0.5 * step, {"loss/a": float(step)})
    old.close()
    new = RunLogger(tmp_path, ["loss/a", "val/b"], tensorboard=False, resume_step=2)
    new.log(3, 9.0, {"loss/a": 30.0, "val/b": 1.0})
    new.close()
    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    kept = [(r["step"], r["loss/a"], r["val/b"]) for r in rows]
    assert kept == [("1", "1", ""), ("2", "2", ""), ("3", "30", "1")]
