"""CUDA graphs of the served pass: bucket arithmetic everywhere, replay equal to eager on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.cuda_graphs import batch_buckets, bucket_for, chunks
from model.inference import served_pass

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_buckets_are_powers_of_two_then_the_largest_batch() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_each_batch_goes_to_the_smallest_bucket_that_holds_it() -> None:
    buckets = batch_buckets(12)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError):
        bucket_for(13, buckets)


def test_oversized_batches_run_in_chunks() -> None:
    assert chunks(5, 8) == [(0, 5)]
    assert chunks(20, 8) == [(0, 8), (8, 16), (16, 20)]


def test_served_pass_matches_the_model_and_the_trust_figures(tiny_artifact: Path) -> None:
    """The pure-tensor pass (what the graphs capture) gives the model's own answer, rounded."""
    from model.artifact import load_artifact
    from model.trust import fidelity_from_counts, field_of_view, stage_disagreement, structure_fidelity

    model = load_artifact(tiny_artifact, "cpu").model
    size = int(load_artifact(tiny_artifact, "cpu").config.working_size)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8))
    with torch.inference_mode():
        out = served_pass(model, pixels, mode="image", trust=True)
        x = pixels.float() / 255.0
        reference = model(x)
        image = reference.images[0].clamp(0, 1)
        vessels_in = torch.softmax(reference.vessel_logits[-1], dim=1)[:, 1]
        expected = structure_fidelity(vessels_in, model.vessels.predict(image)[:, 0], field_of_view(x))
        disagreement = stage_disagreement(reference.images[0], reference.images[1])
        only_vessels = served_pass(model, pixels, mode="vessels", trust=True)
    assert set(out) == {"image", "vessels", "uncertainty", "uncertainty_mean", "vessel_counts"}
    assert (out["image"].int() - (image * 255 + 0.5).to(torch.uint8).int()).abs().max() <= 1
    assert fidelity_from_counts(out["vessel_counts"].numpy()) == expected
    assert torch.allclose(out["uncertainty_mean"], disagreement.mean(dim=(1, 2)), atol=1e-2)
    assert set(only_vessels) == {"vessels"}


@needs_cuda
def test_graph_replay_equals_eager_within_one_grey_level(tiny_artifact: Path) -> None:
    from model.artifact import load_artifact
    from service.runner import ModelRunner

    artifact = load_artifact(tiny_artifact, "cuda")
    size = int(artifact.config.working_size)
    graphed = ModelRunner(artifact.model, torch.device("cuda"), size, cuda_graphs=True, max_batch_size=4)
    assert graphed.graphs is not None
    graphed.warm_up()
    eager = ModelRunner(load_artifact(tiny_artifact, "cuda").model, torch.device("cuda"), size)
    rng = np.random.default_rng(1)
    for count in (1, 3, 4, 6):  # padded buckets and a batch over the largest one
        pixels = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
        a = graphed.infer(pixels, need_image=True, need_vessels=True)
        b = eager.infer(pixels, need_image=True, need_vessels=True)
        assert a.images is not None and b.images is not None and a.images.shape == b.images.shape
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
        assert np.abs(a.vessels.astype(int) - b.vessels.astype(int)).max() <= 1  # type: ignore[union-attr]
        vessels_only = graphed.infer(pixels, need_image=False, need_vessels=True)
        assert vessels_only.images is None and vessels_only.vessels is not None
