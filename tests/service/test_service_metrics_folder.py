"""The metrics folder several API processes share: a vanished process's live gauges are dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.metrics import forget_dead_processes


def test_live_gauges_of_a_vanished_process_are_dropped_and_its_counters_kept(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = int(finished.stdout)  # exited and reaped: no such process any more
    files = {
        "gone_ready": tmp_path / f"gauge_livemin_{gone}.db",
        "gone_inflight": tmp_path / f"gauge_livesum_{gone}.db",
        "gone_requests": tmp_path / f"counter_{gone}.db",
        "own_ready": tmp_path / f"gauge_livemin_{os.getpid()}.db",
        "own_requests": tmp_path / f"counter_{os.getpid()}.db",
    }
    for path in files.values():
        path.write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    assert not files["gone_ready"].exists()
    assert not files["gone_inflight"].exists()
    assert files["gone_requests"].exists()  # totals never go back
    assert files["own_ready"].exists()
    assert files["own_requests"].exists()
