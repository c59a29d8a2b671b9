"""``fundus train rsp|pseudo-masks|enhance`` and ``fundus eval`` (registered through entry points).

Examples:
    fundus train all --config training/configs/gpu.yaml --max-minutes 9
    fundus train rsp --config training/configs/cpu.yaml
    fundus train pseudo-masks --config training/configs/cpu.yaml
    fundus train enhance --config training/configs/cpu.yaml --max-minutes 60
    fundus train enhance --resume runs/cpu/enhance --max-minutes 60
    torchrun --nproc_per_node 8 -m training.cli train enhance --config training/configs/paper.yaml
    fundus eval --weights runs/cpu/enhance/teacher.safetensors --data ../shared/data --out runs/cpu/eval
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

PHASES = ("rsp", "pseudo-masks", "segmenter", "enhance", "quality", "all")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def register_train(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` with one sub-command per phase."""
    parser = subparsers.add_parser(
        "train", help="training phases: rsp, pseudo-masks, segmenter, enhance, or all of them"
    )
    phases = parser.add_subparsers(dest="phase", required=True, metavar="PHASE")
    helps = {
        "rsp": "phase 1: pretrain the vessel (RSP) branch on manual masks",
        "pseudo-masks": "segment clean images without manual masks with the pretrained vessel branch",
        "segmenter": "independent vessel segmenter on clean photographs only (for evaluation)",
        "enhance": "phase 2: mean-teacher T-MAGE-Net training; exports the teacher artifact",
        "quality": "the image-quality grader on DeepDRiD's labels, split by patient (minutes on a CPU)",
        "all": "every phase in order, then the evaluation and the model-card tables (resumable)",
    }
    for phase in PHASES:
        sub = phases.add_parser(phase, help=helps[phase])
        sub.add_argument(
            "--config",
            required=phase in ("pseudo-masks", "all"),
            help="YAML run config (training/configs/*.yaml); with --resume the checkpoint's config is used",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set enhance.steps=500 (repeatable)",
        )
        if phase not in ("pseudo-masks", "all", "quality"):
            sub.add_argument(
                "--resume",
                metavar="DIR",
                help="continue the run in DIR from its checkpoint, with the config saved there "
                "(plus any --set, e.g. --set enhance.steps=4000 to extend it)",
            )
        if phase not in ("pseudo-masks", "quality"):
            sub.add_argument(
                "--max-minutes",
                type=float,
                default=0.0,
                help="checkpoint and exit cleanly after this many minutes (0 = no limit)",
            )
        if phase not in ("pseudo-masks", "all", "quality"):
            sub.add_argument(
                "--stop-at",
                type=int,
                default=0,
                help="checkpoint and exit once this step is reached (0 = run to the end)",
            )
        if phase == "quality":
            sub.set_defaults(func=run_train)
            continue
        if phase == "all":
            sub.add_argument("--data", help="data root for the evaluation (default: data.root of the config)")
            sub.add_argument("--eval-limit", type=int, default=0, help="evaluate at most N images per group")
            sub.add_argument(
                "--native-max-side",
                type=int,
                default=0,
                help="cap the native evaluation size (0 = as stored)",
            )
            sub.set_defaults(func=run_train)
            continue
        sub.add_argument(
            "--run-dir",
            help="phase folder (default runs/<run.name>/<phase>); for pseudo-masks the mask folder "
            "(then point enhance.pseudo_dir at it)",
        )
        sub.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, config_from_dict, load_config

    _setup_logging()
    resume = getattr(args, "resume", None)
    try:
        if resume:
            from training.checkpoint import load_checkpoint

            if args.config:
                logging.getLogger("training").info("--resume: using the config saved in %s", resume)
            config = config_from_dict(load_checkpoint(resume)["config"], args.overrides)
        elif args.config:
            config = load_config(args.config, args.overrides)
        else:
            raise ConfigError("--config is required (or --resume DIR)")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    summary: dict[str, Any]
    try:
        if args.phase == "quality":
            from training.phase_quality import train_quality

            summary = train_quality(config)
        elif args.phase == "all":
            from training.pipeline import run_all

            summary = run_all(
                config,
                max_minutes=args.max_minutes,
                data=args.data,
                eval_limit=args.eval_limit,
                native_max_side=args.native_max_side,
            )
        elif args.phase == "rsp":
            from training.phase_rsp import train_rsp

            summary = train_rsp(
                config,
                resume=args.resume,
                max_minutes=args.max_minutes,
                stop_at=args.stop_at,
                run_dir=args.run_dir,
            )
        elif args.phase == "segmenter":
            from training.phase_segmenter import train_segmenter

            summary = train_segmenter(
                config,
                resume=args.resume,
                max_minutes=args.max_minutes,
                stop_at=args.stop_at,
                run_dir=args.run_dir,
            )
        elif args.phase == "pseudo-masks":
            from training.phase_pseudo import make_pseudo_masks

            summary = make_pseudo_masks(config, out_dir=args.run_dir)
        else:
            from training.phase_enhance import train_enhance

            summary = train_enhance(
                config,
                resume=args.resume,
                max_minutes=args.max_minutes,
                stop_at=args.stop_at,
                run_dir=args.run_dir,
            )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps(summary, indent=1))  # noqa: T201
    return 0


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval``: PSNR/SSIM and vessel metrics on held-out images, JSON + HTML report."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a weight artifact; writes report.json and report.html"
    )
    parser.add_argument("--weights", required=True, help="weight artifact (.safetensors)")
    parser.add_argument(
        "--data",
        default="../shared/data",
        help="data root with splits.json (its test split is used) or a folder of images",
    )
    parser.add_argument("--out", required=True, help="output folder for the report")
    parser.add_argument("--limit", type=int, default=0, help="evaluate at most N images per group (0 = all)")
    parser.add_argument("--size", type=int, default=512, help="working size the images are evaluated at")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--mode", default="cofe", choices=("cofe", "paper"), help="degradation mode")
    parser.add_argument(
        "--resolution",
        default="both",
        choices=("512", "native", "both"),
        help="score at the working size, at the photographs' own geometry through the service's "
        "restore path, or both",
    )
    parser.add_argument(
        "--native-max-side",
        type=int,
        default=0,
        help="scale native photographs so their longer side is at most this (0 = as stored)",
    )
    parser.add_argument(
        "--segmenter",
        default=None,
        help="independent vessel segmenter weights (default: training/weights/segmenter.safetensors)",
    )
    parser.add_argument(
        "--good-photos",
        nargs="+",
        default=[],
        metavar="PATH",
        help="good photographs (files or folders) of the cameras in use: report how much the model "
        "changes them (PSNR against themselves, worst and median)",
    )
    parser.add_argument(
        "--other-degradations",
        action="store_true",
        help="also score faults outside the training family (defocus, motion, JPEG, noise, "
        "underexposure, cataract veil) at the working size",
    )
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError
    from training.evaluate import evaluate
    from training.segmenter import DEFAULT_SEGMENTER

    _setup_logging()
    try:
        report = evaluate(
            args.weights,
            args.data,
            args.out,
            limit=args.limit,
            size=args.size,
            device=args.device,
            mode=args.mode,
            resolution=args.resolution,
            native_max_side=args.native_max_side,
            segmenter=args.segmenter or DEFAULT_SEGMENTER,
            good_photos=args.good_photos,
            other_degradations=args.other_degradations,
        )
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps(report["summary"], indent=1))  # noqa: T201
    return 0


def register_eval_trust(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval-trust``: quality grades, uncertainty vs error and structure fidelity on the test split."""
    parser = subparsers.add_parser(
        "eval-trust", help="check the trust signals of /enhance on the test split; writes trust.json"
    )
    parser.add_argument("--weights", required=True, help="weight artifact (.safetensors)")
    parser.add_argument("--quality", default=None, help="quality grader (default: the bundled one)")
    parser.add_argument("--data", default="../shared/data", help="data root with splits.json")
    parser.add_argument("--out", required=True, help="output folder for trust.json")
    parser.add_argument("--seeds", type=int, default=4, help="degraded copies per clean photograph")
    parser.add_argument("--limit", type=int, default=0, help="at most N images per group (0 = all)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.set_defaults(func=run_eval_trust)


def run_eval_trust(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError
    from model.quality import BUNDLED_QUALITY
    from training.evaluate_trust import evaluate_trust

    _setup_logging()
    try:
        report = evaluate_trust(
            args.weights,
            args.quality or BUNDLED_QUALITY,
            args.data,
            args.out,
            seeds=args.seeds,
            limit=args.limit,
            device=args.device,
        )
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(json.dumps(report["summary"], indent=1))  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m training.cli train ...``), used under torchrun."""
    parser = argparse.ArgumentParser(prog="training.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_train(subparsers)
    register_eval(subparsers)
    register_eval_trust(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
