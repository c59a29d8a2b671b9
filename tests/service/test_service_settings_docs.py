"""Every ``FUNDUS_*`` setting of the API and the worker is documented in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

from service.worker import WorkerSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_readme_row() -> None:
    documented = set(re.findall(r"`(FUNDUS_[A-Z0-9_]+)`", README.read_text()))
    expected = {f"FUNDUS_{name.upper()}" for name in WorkerSettings.model_fields}
    assert expected - documented == set()
