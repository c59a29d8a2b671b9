"""The ``fundus`` command line.

Built-in subcommands live in ``service.commands.<name>`` and expose ``register(subparsers)``.
Training contributes ``train`` and ``eval`` through the ``fundus.commands`` entry-point group,
so this package never imports ``training``; they are simply absent from a serving-only install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

BUILTIN_COMMANDS = ("serve", "worker", "dicom_node", "info", "degrade", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fundus", description="Fundus photograph enhancement (T-MAGE-Net).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in BUILTIN_COMMANDS:
        module = importlib.import_module(f"service.commands.{name}")
        module.register(subparsers)
    for entry in entry_points(group="fundus.commands"):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
