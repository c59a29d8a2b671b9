"""``fundus sample [OUT]``: write the bundled sample fundus photograph (HRF, CC BY 4.0) to try the API."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "hrf-06_h.jpg"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="write a sample fundus photograph (HRF 06_h, CC BY 4.0) to try the service",
        description="Copy the bundled sample photograph (768×512 JPEG from the HRF database, CC BY 4.0; "
        "attribution in service/samples/README.md) to OUT.",
    )
    parser.add_argument("out", nargs="?", default="sample.jpg", help="where to write it (default sample.jpg)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = Path(args.out)
    if target.is_dir():
        target = target / SAMPLE.name
    try:
        shutil.copyfile(SAMPLE, target)
    except OSError as exc:
        print(f"error: cannot write {target}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(target)  # noqa: T201
    return 0
