"""The phase-1/phase-2 recipe options: degraded vessel training, clean pairs, vessel anchoring,
the structure term, real vessel masks in phase 2, good-quality photographs as clean targets, the
independent segmenter, and the validation-selected export."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from model.artifact import load_artifact
from tests.training.helpers import tiny_config
from training.checkpoint import load_checkpoint
from training.config import ConfigError
from training.phase_enhance import BEST_NAME, read_best, train_enhance
from training.phase_rsp import train_rsp
from training.phase_segmenter import train_segmenter
from training.segmenter import SegmenterNet, load_segmenter, save_segmenter
from training.sources import build_split
from training.synthetic import degrade_some
from training.validation import round_robin, selection_score


def _image_batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    clean = torch.rand(n, 3, size, size) * 0.5 + 0.25
    return clean, torch.ones(n, 1, size, size)


def test_degrade_some_keeps_the_asked_share_clean_and_is_reproducible() -> None:
    clean, fov = _image_batch(64)
    untouched = degrade_some(clean, fov, torch.Generator().manual_seed(3), keep_prob=1.0)
    assert untouched is clean
    all_degraded = degrade_some(clean, fov, torch.Generator().manual_seed(3), keep_prob=0.0)
    changed = (all_degraded - clean).abs().flatten(1).amax(dim=1) > 1e-4
    assert changed.float().mean() > 0.8  # a few Cofe draws (1-pixel blur alone) are no-ops
    first = degrade_some(clean, fov, torch.Generator().manual_seed(3), keep_prob=0.5)
    again = degrade_some(clean, fov, torch.Generator().manual_seed(3), keep_prob=0.5)
    assert torch.equal(first, again)
    kept = (first == clean).flatten(1).all(dim=1)
    assert 16 <= int(kept.sum()) <= 48
    with pytest.raises(ValueError):
        degrade_some(clean, fov, torch.Generator(), keep_prob=1.5)


def test_good_quality_rows_become_clean_targets(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root, ["data.quality_clean_sets=[deepdrid]", "data.limit_per_set=6"])
    split = build_split(config.data)
    deepdrid = [r for r in split.records if r.set == "deepdrid"]
    clean = [r for r in deepdrid if "clean" in r.roles]
    unlabeled = [r for r in deepdrid if "unlabeled" in r.roles]
    assert clean and unlabeled and not {r.stem for r in clean} & {r.stem for r in unlabeled}
    assert any("val" in r.roles for r in deepdrid)  # held-out good photographs validate
    assert all("pseudo" in r.roles for r in clean)  # no manual masks: pseudo-masks


def test_unknown_vessel_anchor_is_a_config_error(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(ConfigError, match="vessel_anchor"):
        tiny_config(tmp_path, data_root, ["enhance.loss.vessel_anchor=loose"])
    with pytest.raises(ConfigError, match="identity_prob"):
        tiny_config(tmp_path, data_root, ["enhance.identity_prob=2"])


def _vessel_state(run: Path, part: str) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run)["task"][part]
    return {k: v for k, v in state.items() if k.startswith("vessels.")}


@pytest.fixture
def phase_one(tmp_path: Path, data_root: Path) -> Path:
    config = tiny_config(tmp_path, data_root, ["rsp.degrade_prob=0.5"])
    summary = train_rsp(config)
    assert summary["finished"]
    return Path(summary["weights"])


def test_frozen_branch_stays_the_phase_one_branch(tmp_path: Path, data_root: Path, phase_one: Path) -> None:
    overrides = ["enhance.loss.vessel_anchor=frozen", "enhance.loss.structure_weight=1.0"]
    config = tiny_config(tmp_path, data_root, overrides)
    summary = train_enhance(config)
    run = Path(summary["run_dir"])
    from safetensors.torch import load_file

    pretrained = load_file(str(phase_one))
    for part in ("student", "teacher"):
        for name, value in _vessel_state(run, part).items():
            assert torch.equal(value, pretrained[name.removeprefix("vessels.")]), f"{part}.{name}"
    with (run / "log.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["loss/total"]]
    assert all(float(r["loss/structure"]) >= 0 for r in rows) and rows[0]["loss/vessel"]
    assert not any(r["loss/anchor"] for r in rows)


def test_distilled_branch_trains_and_is_anchored(tmp_path: Path, data_root: Path, phase_one: Path) -> None:
    overrides = [
        "enhance.loss.vessel_anchor=distill",
        "enhance.loss.vessel_lr_scale=0.5",
        "enhance.loss.real_vessel_weight=0.5",
    ]
    config = tiny_config(tmp_path, data_root, overrides)
    run = Path(train_enhance(config)["run_dir"])
    from safetensors.torch import load_file

    pretrained = load_file(str(phase_one))
    moved = [
        name
        for name, value in _vessel_state(run, "student").items()
        if not torch.equal(value, pretrained[name.removeprefix("vessels.")])
    ]
    assert moved  # the branch is trained...
    with (run / "log.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["loss/total"]]
    assert all(r["loss/anchor"] and r["loss/real_vessel"] for r in rows)  # ...and anchored
    optimizer = load_checkpoint(run)["task"]["optimizer"]
    lrs = [group["lr"] for group in optimizer["param_groups"]]
    assert len(lrs) == 2 and lrs[1] == pytest.approx(0.5 * lrs[0])


def test_finished_run_exports_the_validation_selected_teacher(
    tmp_path: Path, data_root: Path, phase_one: Path
) -> None:
    config = tiny_config(tmp_path, data_root, ["enhance.loss.vessel_anchor=frozen"])
    summary = train_enhance(config)
    run = Path(summary["run_dir"])
    best = read_best(run / BEST_NAME)
    assert best is not None and best["step"] in (2, 4)
    with (run / "log.csv").open() as handle:
        scores = {int(r["step"]): float(r["val/score"]) for r in csv.DictReader(handle) if r["val/score"]}
    assert best["score"] == pytest.approx(max(scores.values()))
    exported = load_artifact(run / "teacher.safetensors")
    chosen = load_artifact(run / BEST_NAME)
    assert exported.sha256 == chosen.sha256
    assert exported.training["selected"]["step"] == best["step"]
    for key in (
        "val/native_psnr",
        "val/native_psnr_clean",
        "val/real_vessel_iou",
        "val/psnr_clean",
        "val/psnr_clean_worst",
    ):
        assert key in exported.metrics["validation"], key


def test_ablation_without_teacher_validates_and_exports_the_student(
    tmp_path: Path, data_root: Path, phase_one: Path
) -> None:
    config = tiny_config(
        tmp_path,
        data_root,
        [
            "enhance.loss.vessel_anchor=frozen",
            "enhance.loss.consistency_weight=0",
            "enhance.export_source=student",
            "logging.val_every=4",  # one validation, at the last step
        ],
    )
    summary = train_enhance(config)
    run = Path(summary["run_dir"])
    state = load_checkpoint(run)["task"]
    exported = load_artifact(run / "teacher.safetensors")
    assert exported.training["mean_teacher"] is False and exported.training["exported"] == "student"
    best = read_best(run / BEST_NAME)
    assert best is not None and best["step"] == summary["steps"] == 4
    weights = exported.model.state_dict()  # the final student, not its EMA
    for name, value in state["student"].items():
        assert torch.equal(weights[name], value), name
    assert any(not torch.equal(weights[n], v) for n, v in state["teacher"].items())
    assert load_artifact(run / BEST_NAME).sha256 == exported.sha256  # validated = exported


def test_segmenter_trains_on_clean_photographs_only(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root, ["segmenter.steps=3", "segmenter.width=4"])
    summary = train_segmenter(config)
    assert summary["finished"] and Path(summary["weights"]).is_file()
    # Clean photographs with manual masks only: never CHASE_DB1's real low-quality ones.
    assert set(summary["trained_on"]) == {"hrf", "fives"}
    net = load_segmenter(summary["weights"])
    assert isinstance(net, SegmenterNet) and net.width == 4
    prob = net.predict(torch.rand(1, 3, 40, 36))
    assert prob.shape == (1, 1, 40, 36) and 0 <= float(prob.min()) <= float(prob.max()) <= 1


def test_phase_one_trains_on_every_manual_mask(tmp_path: Path, data_root: Path) -> None:
    summary = train_rsp(tiny_config(tmp_path, data_root))
    assert set(summary["trained_on"]) == {"hrf", "fives", "chase_db1"}


def test_segmenter_file_round_trip_and_kind_check(tmp_path: Path, tiny_artifact: Path) -> None:
    net = SegmenterNet(4)
    save_segmenter(tmp_path / "s.safetensors", net, {"steps": 0})
    loaded = load_segmenter(tmp_path / "s.safetensors")
    x = torch.rand(1, 3, 24, 24)
    assert torch.allclose(loaded(x), net.eval()(x))
    with pytest.raises(ValueError, match="not an independent segmenter"):
        load_segmenter(tiny_artifact)
    with pytest.raises(FileNotFoundError):
        load_segmenter(tmp_path / "missing.safetensors")


def test_round_robin_and_selection_score() -> None:
    from training.sources import ImageRecord

    records = [ImageRecord(s, f"{s}{i}", Path("x")) for s in ("a", "b", "c") for i in range(3)]
    assert [r.set for r in round_robin(records, 5)] == ["a", "b", "c", "a", "b"]
    base = {
        "val/psnr": 25.0,
        "val/psnr_input": 20.0,
        "val/native_psnr": 23.0,
        "val/native_psnr_input": 20.0,
        "val/indep_auc": 0.90,
        "val/indep_auc_input": 0.88,
        "val/psnr_clean": 35.0,
        "val/native_psnr_clean": 33.0,
    }
    assert selection_score(base) == pytest.approx(4.0)
    assert selection_score({**base, "val/indep_auc": 0.87}) == pytest.approx(-6.0)
    assert selection_score({**base, "val/native_psnr_clean": 29.0}) == pytest.approx(-6.0)
    # One harmed photograph fails the guard even when the mean over the others hides it.
    assert selection_score({**base, "val/psnr_clean_worst": 31.0}) == pytest.approx(4.0)
    assert selection_score({**base, "val/psnr_clean_worst": 24.0}) == pytest.approx(-6.0)


def test_run_can_start_from_shipped_weights(tmp_path: Path, data_root: Path, phase_one: Path) -> None:
    """``enhance.init_weights`` + an artifact as ``rsp_checkpoint``: a run continues from a weight file
    alone (no phase-1 folder), starting exactly at its weights."""
    first = train_enhance(tiny_config(tmp_path, data_root, ["enhance.loss.vessel_anchor=frozen"]))
    shipped = Path(first["weights"])
    still = [
        f"enhance.init_weights={shipped}",
        f"enhance.rsp_checkpoint={shipped}",
        "enhance.loss.vessel_anchor=frozen",
        "enhance.loss.structure_weight=1.0",
        "enhance.optim.lr=0",
        "enhance.optim.lr_min=0",
        "run.name=continued",
    ]
    run = Path(train_enhance(tiny_config(tmp_path, data_root, still))["run_dir"])
    start = load_artifact(shipped).model.state_dict()
    student = load_checkpoint(run)["task"]["student"]
    assert all(torch.equal(student[name], value) for name, value in start.items())

    # Without init_weights the same (frozen-rate) run keeps a random restorer: the file mattered.
    fresh = Path(train_enhance(tiny_config(tmp_path, data_root, [*still[1:], "run.name=fresh"]))["run_dir"])
    state = load_checkpoint(fresh)["task"]["student"]
    assert any(not torch.equal(state[k], v) for k, v in start.items() if not k.startswith("vessels."))
    assert all(torch.equal(state[k], v) for k, v in start.items() if k.startswith("vessels."))


def test_init_weights_of_another_preset_are_refused(tmp_path: Path, data_root: Path, phase_one: Path) -> None:
    shipped = Path(
        train_enhance(tiny_config(tmp_path, data_root, ["enhance.loss.vessel_anchor=frozen"]))["weights"]
    )
    overrides = [f"enhance.init_weights={shipped}", "model.preset=lite", "enhance.loss.use_rsp=false"]
    other = tiny_config(tmp_path, data_root, [*overrides, "run.name=other"])
    with pytest.raises(ValueError, match="this run trains 'lite'"):
        train_enhance(other)
