"""One torch thread for the training tests: the CI machine's 2 cores are shared, and OpenMP
oversubscription slows the tiny convolutions of these tests by an order of magnitude."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
