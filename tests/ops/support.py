"""Helpers shared by the deployment tests: repository paths, free loopback ports, bounded polling."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.polling import free_port  # noqa: F401  (re-exported to the deployment tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Call ``probe`` until it returns something other than None/False, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as error:  # the server may not be up yet: keep polling until the deadline
            last_error = error
            result = None
        if result is not None and result is not False:
            return result
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error!r})")


def require_tool(name: str, install_hint: str) -> str:
    """Absolute path of a command-line tool the tests cannot do without; fails (never skips) if missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; {install_hint}")
    return path
