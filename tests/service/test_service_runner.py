"""The batch runner: one shared pass for mixed tasks, results split per job, OOM splitting, CPU layout
and the heap set-up of model processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import service.runner as runner_module
from model.artifact import load_artifact
from model.device import GLIBC_HEAP_TUNABLES
from service.queue.base import Job, Task
from service.runner import ModelRunner, prepare_model_process
from service.settings import Settings


@pytest.fixture(scope="module")
def runner(tiny_artifact: Path) -> ModelRunner:
    torch.set_num_threads(1)
    artifact = load_artifact(tiny_artifact, "cpu")
    return ModelRunner(artifact.model, torch.device("cpu"), artifact.config.working_size)


def _jobs(size: int, tasks: list[Task]) -> list[Job]:
    rng = np.random.default_rng(1)
    return [
        Job(f"r{i}", task, rng.integers(0, 255, (3, size, size), dtype=np.uint8), time.time() + 60)
        for i, task in enumerate(tasks)
    ]


def test_mixed_batch_returns_what_each_job_asked_for(runner: ModelRunner) -> None:
    seen: list[tuple[int, float]] = []
    runner.on_batch = lambda size, seconds: seen.append((size, seconds))
    jobs = _jobs(runner.working_size, [Task.ENHANCE, Task.SEGMENT, Task.ENHANCE])
    results = runner.run_jobs(jobs)
    runner.on_batch = None
    assert len(results) == 3 and seen and seen[0][0] == 3
    size = runner.working_size
    assert results[0].image is not None and results[0].image.shape == (3, size, size)
    assert results[0].vessels is None
    assert results[1].image is None and results[1].vessels is not None
    assert results[1].vessels.shape == (size, size) and results[1].vessels.dtype == np.uint8
    assert all(r.batch_size == 3 for r in results)
    alone = runner.run_jobs([jobs[2]])[0]
    assert alone.image is not None
    assert np.abs(alone.image.astype(int) - results[2].image.astype(int)).max() <= 1


def test_wrong_input_shape_is_refused(runner: ModelRunner) -> None:
    with pytest.raises(ValueError, match="expected uint8"):
        runner.infer(np.zeros((1, 3, 8, 8), np.uint8), need_image=True, need_vessels=False)


@pytest.mark.parametrize("trust_signals", [False, True])
def test_out_of_memory_halves_the_batch(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, trust_signals: bool
) -> None:
    real = runner.model.forward
    sizes: list[int] = []

    def limited(x: torch.Tensor):  # type: ignore[no-untyped-def]
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(runner.model, "forward", limited)
    monkeypatch.setattr(runner, "trust_signals", trust_signals)
    results = runner.run_jobs(_jobs(runner.working_size, [Task.ENHANCE] * 5))
    assert len(results) == 5 and all(r.image is not None for r in results)
    assert sizes[0] == 5 and sum(s for s in sizes if s <= 2) == 5  # every image ran once, in halves
    assert all((r.uncertainty is not None and r.fidelity is not None) is trust_signals for r in results)
    assert all((r.uncertainty_mean is not None) is trust_signals for r in results)


def test_cpu_runner_runs_channels_last_and_matches_the_default_layout(
    runner: ModelRunner, tiny_artifact: Path
) -> None:
    assert runner.memory_format is torch.channels_last
    conv_weight = next(p for p in runner.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    size = runner.working_size
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    output = runner.infer(pixels, need_image=True, need_vessels=True)
    assert output.images is not None and output.vessels is not None
    assert output.images.flags.c_contiguous and output.vessels.flags.c_contiguous

    reference = load_artifact(tiny_artifact, "cpu").model  # default (NCHW) layout
    image, vessels = reference.infer(
        torch.from_numpy(pixels).float() / 255.0, need_image=True, need_vessels=True
    )
    assert image is not None and vessels is not None
    expected_image = (image * 255.0 + 0.5).to(torch.uint8).numpy()
    expected_vessels = (vessels[:, 0] * 255.0 + 0.5).to(torch.uint8).numpy()
    assert np.abs(output.images.astype(int) - expected_image.astype(int)).max() <= 1
    assert np.abs(output.vessels.astype(int) - expected_vessels.astype(int)).max() <= 1


def test_model_process_setup_reuses_the_heap_and_passes_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[bool] = []
    monkeypatch.setattr(runner_module, "reuse_freed_memory", lambda: applied.append(True) or True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    prepare_model_process(Settings(reuse_freed_memory=True))
    assert applied == [True]
    assert os.environ["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{GLIBC_HEAP_TUNABLES}"

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # the operator's own choice stays
    prepare_model_process(Settings(reuse_freed_memory=True))
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"

    monkeypatch.delenv("GLIBC_TUNABLES")
    applied.clear()
    prepare_model_process(Settings(reuse_freed_memory=False))
    assert applied == [] and "GLIBC_TUNABLES" not in os.environ


def test_runner_grades_input_and_output_like_the_api_grader(tiny_artifact: Path) -> None:
    """The model process grades inside its pass; the figures match grading the same uint8 images in
    the API process (resize by area averaging either way)."""
    from model.quality import BUNDLED_QUALITY, load_quality

    artifact = load_artifact(tiny_artifact, "cpu")
    grader = load_quality(BUNDLED_QUALITY)
    graded = ModelRunner(
        artifact.model,
        torch.device("cpu"),
        artifact.config.working_size,
        grader=load_quality(BUNDLED_QUALITY),
    )
    jobs = _jobs(graded.working_size, [Task.ENHANCE, Task.SEGMENT, Task.ENHANCE])
    results = graded.run_jobs(jobs)
    for job, result in zip(jobs, results, strict=True):
        if job.task is Task.SEGMENT:
            assert result.quality_before is None and result.quality_after is None
            continue
        assert (
            result.quality_before is not None
            and result.quality_after is not None
            and result.image is not None
        )
        before, after = grader.probabilities(
            np.stack([job.pixels.transpose(1, 2, 0), result.image.transpose(1, 2, 0)])
        )
        assert result.quality_before == pytest.approx(before, abs=0.02)
        assert result.quality_after == pytest.approx(after, abs=0.02)
