"""Command-line flags that override ``FUNDUS_*`` settings (``fundus serve``, ``fundus dicom-node``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def settings_with_flags(flags: Mapping[str, object]) -> Settings | None:
    """Export each given flag as ``FUNDUS_<NAME>`` (``None`` = not given), then load the settings.

    Exporting rather than passing keeps child processes (uvicorn workers, the model process) on the
    same values. Returns ``None`` after printing the reason when the settings are invalid.
    """
    from pydantic import ValidationError

    from service.settings import load_settings

    for name, value in flags.items():
        if value is not None:
            os.environ[f"FUNDUS_{name}"] = str(value)
    try:
        return load_settings()
    except ValidationError as exc:
        print(f"error: invalid FUNDUS_* settings:\n{exc}", file=sys.stderr)  # noqa: T201
        return None
