"""``fundus info``: parameter count, GFLOPs at 512², config and artifact metadata."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="describe a model preset or a weight artifact")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="preset name: paper, lite or tiny")
    source.add_argument("--weights", help="path to a .safetensors weight artifact")
    parser.add_argument("--size", type=int, default=512, help="square input size for the FLOP count")
    parser.add_argument("--json", action="store_true", help="print JSON (default: indented text)")
    parser.set_defaults(func=run)


def describe_preset(name: str, size: int) -> dict[str, Any]:
    from model.flops import count_gflops
    from model.magenet import MageNet
    from model.presets import get_preset

    config = get_preset(name)
    network = MageNet(config)
    return {
        "preset": name,
        "parameters": sum(p.numel() for p in network.parameters()),
        "vessel_parameters": sum(p.numel() for p in network.vessels.parameters()),
        f"gflops_at_{size}": round(count_gflops(network, size), 2),
        "config": config.to_dict(),
    }


def describe_weights(path: str) -> dict[str, Any]:
    from model.artifact import load_artifact

    artifact = load_artifact(path)
    return {
        "path": path,
        "preset": artifact.preset,
        "version": artifact.version,
        "sha256": artifact.sha256,
        "parameters": artifact.parameter_count,
        "created": artifact.created,
        "config": artifact.config.to_dict(),
        "training": artifact.training,
        "metrics": artifact.metrics,
    }


def run(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError

    try:
        info = describe_preset(args.preset, args.size) if args.preset else describe_weights(args.weights)
    except (ArtifactError, ValueError) as exc:
        print(f"error: {exc}")  # noqa: T201
        return 2
    print(json.dumps(info, indent=None if args.json else 2))  # noqa: T201
    return 0
