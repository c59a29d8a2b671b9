"""DICOM test fixtures: photographs built from the data pack, a real Orthanc PACS, the dciodvfy validator."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.dicom.builders import load_fundus_rgb

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_TEMPLATE = Path(__file__).with_name("orthanc.json")
READY_DEADLINE_S = 60.0


@pytest.fixture(scope="session")
def fundus_rgb(data_root: Path) -> np.ndarray:
    """A real HRF photograph at 128×96: uint8 [96, 128, 3]."""
    return load_fundus_rgb(data_root / "hrf" / "images" / "01_dr.jpg")


def dciodvfy_errors(data: bytes, directory: Path, name: str = "instance.dcm") -> list[str]:
    """Run ``dciodvfy`` on a Part-10 file; its ``Error`` lines (warnings are allowed)."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy not found: install the Debian package dicom3tools")
    path = directory / name
    path.write_bytes(data)
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Abort"))]


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc on a loopback port."""

    base_url: str

    @property
    def dicomweb_root(self) -> str:
        return f"{self.base_url}/dicom-web"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"Orthanc exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(f"{base_url}/system", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)  # the poll interval; returns at once if Orthanc dies
    pytest.fail(
        f"Orthanc not ready within {READY_DEADLINE_S}s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc with the DICOMweb plugin, storage in a temp dir, HTTP on a free loopback port."""
    if not Path(ORTHANC_BINARY).exists():
        pytest.fail("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
    root = tmp_path_factory.mktemp("orthanc")
    storage = root / "storage"
    storage.mkdir()
    config = json.loads(ORTHANC_TEMPLATE.read_text())
    config["StorageDirectory"] = config["IndexDirectory"] = str(storage)
    port = _free_port()
    config["HttpPort"] = port
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "orthanc.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [ORTHANC_BINARY, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, process, log_path)
        yield OrthancServer(base_url=base_url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
