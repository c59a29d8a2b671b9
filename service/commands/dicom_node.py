"""``fundus dicom-node``: the DIMSE Storage SCP that enhances what cameras send and C-STOREs it to a PACS.

Settings come from ``FUNDUS_*`` (``FUNDUS_DIMSE_*`` for the node itself, the model, queue and limit
settings as for ``fundus serve``); the flags override them. Exit status: 0 after SIGTERM/SIGINT
(running work finished or left in the spool), 2 on a configuration or start-up error.
"""

from __future__ import annotations

import argparse
import sys

# flag → FUNDUS_* variable it overrides
_OVERRIDES = {
    "ae_title": "DIMSE_AE_TITLE",
    "host": "DIMSE_HOST",
    "port": "DIMSE_PORT",
    "metrics_port": "DIMSE_METRICS_PORT",
    "destination": "DIMSE_DESTINATION",
    "spool_dir": "DIMSE_SPOOL_DIR",
    "weights": "WEIGHTS",
    "device": "DEVICE",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dicom-node",
        help="run the DICOM network node: C-STORE in, enhanced instances C-STOREd to a PACS",
        description="A DIMSE Storage SCP (C-ECHO, C-STORE) that spools every received photograph, "
        "enhances it through the service's queue and sends the derived instances to the destination AE. "
        "Flags override the FUNDUS_* environment.",
    )
    parser.add_argument("--ae-title", help="this node's AE title (FUNDUS_DIMSE_AE_TITLE)")
    parser.add_argument("--host", help="bind address (FUNDUS_DIMSE_HOST)")
    parser.add_argument("--port", type=int, help="DICOM port (FUNDUS_DIMSE_PORT)")
    parser.add_argument(
        "--metrics-port", type=int, help="/metrics and probes port, 0 = off (FUNDUS_DIMSE_METRICS_PORT)"
    )
    parser.add_argument("--destination", help="AE@host:port of the PACS (FUNDUS_DIMSE_DESTINATION)")
    parser.add_argument("--spool-dir", help="durable spool directory (FUNDUS_DIMSE_SPOOL_DIR)")
    parser.add_argument("--weights", help="weight artifact (FUNDUS_WEIGHTS)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (FUNDUS_DEVICE)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError
    from service.commands.flags import settings_with_flags
    from service.logging import configure_logging

    settings = settings_with_flags({name: getattr(args, flag, None) for flag, name in _OVERRIDES.items()})
    if settings is None:
        return 2
    configure_logging(settings.log_level)

    from service.dimse.config import DimseConfigError
    from service.dimse.node import DicomNode
    from service.dimse.spool import SpoolError
    from service.runner import DeviceSettingError, prepare_model_process

    try:
        node = DicomNode(settings)
    except DimseConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if not settings.redis_url:
        prepare_model_process(settings)  # the model runs in this process: heap set-up before threads
    try:
        node.serve_forever()
    except (SpoolError, ArtifactError, DeviceSettingError, OSError, ValueError, KeyError) as exc:
        print(f"error: cannot start the DICOM node: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0
