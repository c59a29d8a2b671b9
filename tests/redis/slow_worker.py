"""``fundus worker`` with a test-only pause before every batch (seconds in ``FUNDUS_TEST_BATCH_DELAY_S``).

The pause widens the window in which a test can kill a worker that holds a batch, or send it
SIGTERM mid-batch. Everything else is the production command: same flags, settings and loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from service.commands import worker as worker_command


def delayed(run_batch: Callable[[Sequence[Any]], list[Any]]) -> Callable[[Sequence[Any]], list[Any]]:
    delay = float(os.environ.get("FUNDUS_TEST_BATCH_DELAY_S", "0"))

    def run(jobs: Sequence[Any]) -> list[Any]:
        time.sleep(delay)  # simulated slow accelerator
        return run_batch(jobs)

    return run


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="slow-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    worker_command.register(commands)
    args = parser.parse_args(["worker", *argv])
    return worker_command.serve(worker_command.settings_from_args(args), wrap=delayed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
