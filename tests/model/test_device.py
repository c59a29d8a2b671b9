"""Device selection, the inference memory layout, and the heap setting of model processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.device import GLIBC_HEAP_TUNABLES, conv_memory_format, select_device

REPO_ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# A new thread mallocs, fills and frees the same large block again and again, as a model thread does
# with its activations, and reports the page faults of the repeats (the first one may grow the heap).
_CHURN = """
import ctypes, resource, sys, threading
from model.device import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = {}
def churn():
    for mib in (16, 96):  # fits a thread's own heap (64 MiB); above glibc's largest mmap threshold
        size = mib << 20
        for repeat in range(5):
            if repeat == 1:
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            libc.free(block)
        faults[mib] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(faults[16], faults[96])
"""


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda:0")


def test_cpu_inference_uses_channels_last() -> None:
    assert conv_memory_format(torch.device("cpu")) is torch.channels_last
    assert conv_memory_format(torch.device("cuda")) is torch.contiguous_format  # training
    assert conv_memory_format(torch.device("cuda"), inference=True) is torch.channels_last


def _churn_faults(mode: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", _CHURN, mode],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    small, large = (int(value) for value in done.stdout.split())
    return small, large


@pytest.mark.skipif(not GLIBC, reason="heap reuse is a glibc setting")
def test_reused_heap_stops_page_faults_on_repeated_large_blocks() -> None:
    pages_of_96_mib = (96 << 20) // os.sysconf("SC_PAGE_SIZE")
    _, large_default = _churn_faults("default")
    small_reuse, large_reuse = _churn_faults("reuse")
    # Control: with glibc's defaults every repeat of the 96 MiB block faults all its pages in again.
    assert large_default >= 4 * pages_of_96_mib
    assert small_reuse + large_reuse < 0.01 * pages_of_96_mib


def test_heap_tunables_match_the_in_process_setting() -> None:
    names = {item.split("=")[0] for item in GLIBC_HEAP_TUNABLES.split(":")}
    assert names == {"glibc.malloc.arena_max", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold"}
