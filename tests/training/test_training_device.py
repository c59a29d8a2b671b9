"""Training device selection on a single GPU and under torchrun, exercised on the CPU.

``torch.cuda.set_device`` needs a device with an index; the patched version below validates its
argument exactly as torch does (``_get_device_index`` without ``optional``), so an index-less
``cuda`` device fails here as it does on a real GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch.cuda._utils import _get_device_index

from training import runtime


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pretend CUDA is available; record the indices passed to ``torch.cuda.set_device``."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(_get_device_index(device)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return chosen


@pytest.mark.parametrize(("preference", "expected"), [("cuda", 0), ("auto", 0), ("cuda:1", 1), ("CUDA:0", 0)])
def test_single_process_cuda_device_has_an_index(fake_gpu: list[int], preference: str, expected: int) -> None:
    env, device = runtime.init_distributed(preference)
    assert not env.distributed
    assert device == torch.device("cuda", expected)
    assert fake_gpu == [expected]


def test_torchrun_rank_uses_its_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = runtime.DistEnv(rank=3, world_size=4, local_rank=3)
    assert runtime.training_device("cuda", env) == torch.device("cuda", 3)
    assert runtime.training_device("cuda:0", env) == torch.device("cuda", 3)
    assert runtime.training_device("auto", env) == torch.device("cuda", 3)


def test_cpu_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = runtime.DistEnv()
    assert runtime.training_device("auto", env) == torch.device("cpu")
    assert runtime.training_device("cpu", env) == torch.device("cpu")
    with pytest.raises(RuntimeError):
        runtime.training_device("cuda", env)
