"""Roles and split, the stateless sampler and the joint augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.training.helpers import tiny_config
from training.datasets import StepBatchSampler, WorkingDataset, crop_batch
from training.prepare import WorkingCache
from training.runtime import DistEnv
from training.session import Session, prepare_cache
from training.sources import build_split, load_test_keys


def test_split_is_deterministic_and_never_uses_test_images(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root, ["data.limit_per_set=0"])
    first, second = build_split(config.data), build_split(config.data)
    assert [(r.key, r.roles) for r in first.records] == [(r.key, r.roles) for r in second.records]
    test_keys = load_test_keys(data_root)
    assert len(test_keys) == 18
    for record in first.records:
        if record.key in test_keys:
            assert record.roles == ["test"]
        assert not ({"val", "test"} & set(record.roles)) or len(record.roles) == 1
    counts = first.counts()
    assert counts["clean"]["hrf"] > 20 and counts["clean"]["idrid"] > 100
    assert set(counts["vessel"]) == {"hrf", "chase_db1", "fives"}
    assert set(counts["pseudo"]) >= {"idrid"} and "fives" not in counts["pseudo"]
    assert counts["unlabeled"]["deepdrid"] == 400  # the poor-quality half
    assert counts["unlabeled"]["chase_db1"] > 0
    # HRF images without a manual mask are clean but need pseudo-masks.
    hrf_11 = next(r for r in first.records if r.key == "hrf/11_h")
    assert "vessel" not in hrf_11.roles
    first.write(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "split.json").read_text())
    assert set(written["test"]) == test_keys
    assert (tmp_path / "out" / "roles.csv").read_text().count("\n") == len(first.records) + 1


def test_sampler_is_a_function_of_the_step_and_shards_ranks() -> None:
    full = StepBatchSampler(10, 3, seed=5, total_steps=8)
    resumed = StepBatchSampler(10, 3, seed=5, total_steps=8, start_step=4)
    assert list(full)[4:] == list(resumed)
    ranks = [StepBatchSampler(20, 2, seed=5, total_steps=5, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        a, b = (s.batch_at(step) for s in ranks)
        assert not {x[1] for x in a} & {x[1] for x in b}  # distinct sample seeds
    epoch = [i for step in range(5) for s in ranks for i, _ in s.batch_at(step)]
    assert sorted(epoch) == list(range(20))  # one pass covers every item once


def test_joint_flips_and_crops_keep_image_and_masks_aligned(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    records = build_split(config.data).with_role("vessel")
    cache = WorkingCache(config.data.cache_dir, 64)
    whole = WorkingDataset(records, cache, 0)
    cropped = WorkingDataset(records, cache, 40)
    deferred = WorkingDataset(records, cache, 40, crop_here=False)
    for seed in range(6):
        a = whole[(0, seed)]
        b = cropped[(0, seed)]
        c = deferred[(0, seed)]
        y, x = b["corner"].tolist()
        for key in ("image", "fov", "vessel"):
            assert torch.equal(b[key], a[key][:, y : y + 40, x : x + 40])
            assert torch.equal(crop_batch(c[key][None], c["corner"][None], 40)[0], b[key])
        # The image is black outside the FOV and vessels lie inside it, whatever the flip.
        assert int(a["image"][:, a["fov"][0] == 0].max()) == 0
        assert int(a["vessel"][a["fov"] == 0].max()) == 0
        assert a["has_vessel"].item() == 1.0
    sample = cache.load(records[0])
    assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
    original = torch.from_numpy(sample.image).permute(2, 0, 1)
    same = {torch.equal(whole[(0, seed)]["image"], original) for seed in range(32)}
    assert same == {True, False}  # some seeds flip, some do not


def test_threaded_cache_fill_equals_one_by_one(tmp_path: Path, data_root: Path) -> None:
    config = tiny_config(tmp_path, data_root)
    records = build_split(config.data).records
    serial = WorkingCache(tmp_path / "serial", 48)
    for record in records:
        serial.ensure(record)
    session = Session(
        config, DistEnv(), torch.device("cpu"), tmp_path / "run", build_split(config.data), None
    )
    threaded = WorkingCache(tmp_path / "threaded", 48)
    prepare_cache(records + records[::-1], threaded, session)  # duplicates: one thread per photograph

    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.png"))
    assert len(files) >= 2 * len(records)
    assert (
        sorted(
            p.relative_to(tmp_path / "threaded") for p in (tmp_path / "threaded").rglob("*") if p.is_file()
        )
        == files
    )  # no temporary file left behind
    for name in files:
        assert (tmp_path / "threaded" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()
