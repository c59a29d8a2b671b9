"""DIMSE test fixtures: a real Orthanc with its DICOM port as the destination, the node (in this process
or as ``python -m service.cli dicom-node``), dcmtk's ``storescu``/``echoscu`` as the camera, and polling
helpers with deadlines (no sleeps as synchronisation)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from service.dimse.node import DicomNode
from service.settings import Settings
from tests.conftest import REPO_ROOT
from tests.dicom.builders import load_fundus_rgb
from tests.dicom.conftest import ORTHANC_BINARY, ORTHANC_TEMPLATE
from tests.polling import free_port, wait_for

NODE_AE = "FUNDUSNODE"
CAMERA_AE = "CAMERA1"
ORTHANC_AE = "ORTHANC"


def dcmtk_tool(name: str) -> str | None:
    """dcmtk's ``name`` on PATH, never pynetdicom's console script of the same name beside the interpreter
    (an activated virtual environment puts its ``storescu``/``echoscu``, with other options, first)."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    path = os.environ.get("PATH", "").split(os.pathsep)
    elsewhere = [d for d in path if d and Path(d).resolve() != scripts]
    return shutil.which(name, path=os.pathsep.join(elsewhere))


STORESCU = dcmtk_tool("storescu")
ECHOSCU = dcmtk_tool("echoscu")


@pytest.fixture(scope="session")
def fundus_photo(data_root: Path) -> np.ndarray:
    """A real HRF photograph at 128×96: uint8 [96, 128, 3]."""
    return load_fundus_rgb(data_root / "hrf" / "images" / "01_dr.jpg")


# -- Orthanc with its DICOM port ---------------------------------------------------------------------


@dataclass
class Orthanc:
    """A real Orthanc on loopback: REST on ``http_port``, DIMSE on ``dicom_port`` (AE ``ORTHANC``)."""

    root: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{ORTHANC_AE}@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        if not Path(ORTHANC_BINARY).exists():
            pytest.fail("Orthanc not installed: apt-get install orthanc")
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = json.loads(ORTHANC_TEMPLATE.read_text())
        config.update(
            {
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "HttpPort": self.http_port,
                "Plugins": [],  # the DICOMweb plugin is not needed here
                "DicomServerEnabled": True,
                "DicomAet": ORTHANC_AE,
                "DicomPort": self.dicom_port,
                "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
            }
        )
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = self.root / "orthanc.log"
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT
            )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                up = httpx.get(f"{self.base_url}/system", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False
            with socket.socket() as sock:
                return up and sock.connect_ex(("127.0.0.1", self.dicom_port)) == 0

        wait_for(answers, 60.0, "Orthanc's REST and DICOM ports")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.process = None

    def instance_ids(self) -> list[str]:
        ids: list[str] = httpx.get(f"{self.base_url}/instances", timeout=10).json()
        return ids

    def instances(self) -> list[pydicom.Dataset]:
        """Every stored instance, parsed (pixel data included)."""
        out = []
        for instance_id in self.instance_ids():
            data = httpx.get(f"{self.base_url}/instances/{instance_id}/file", timeout=10).content
            out.append(pydicom.dcmread(io.BytesIO(data)))
        return out

    def count(self) -> int:
        return len(self.instance_ids())


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Make Orthancs (started unless ``start=False``, e.g. to start one later on a known port)."""
    made: list[Orthanc] = []

    def make(start: bool = True) -> Orthanc:
        server = Orthanc(root=tmp_path / f"orthanc-{len(made)}")
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        server.kill()  # throw-away storage: no need to wait for Orthanc's orderly shutdown


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    return orthanc_factory()


# -- the node ----------------------------------------------------------------------------------------------


def node_settings(weights: Path, spool: Path, destination: str, **overrides: Any) -> Settings:
    """Settings of a test node: tiny weights, loopback ports, fast retries."""
    values: dict[str, Any] = {
        "weights": weights,
        "device": "cpu",
        "redis_url": None,
        "cpu_workers": 1,
        "torch_threads": 1,
        "max_batch_size": 4,
        "max_batch_wait_ms": 2.0,
        "request_timeout_s": 60.0,
        "log_level": "WARNING",
        "warmup": False,
        "dimse_ae_title": NODE_AE,
        "dimse_host": "127.0.0.1",
        "dimse_port": free_port(),
        "dimse_metrics_port": free_port(),
        "dimse_destination": destination,
        "dimse_spool_dir": spool,
        "dimse_retry_initial_s": 0.2,
        "dimse_retry_max_s": 1.0,
        "dimse_acse_timeout_s": 10.0,
        "dimse_dimse_timeout_s": 30.0,
        "dimse_network_timeout_s": 30.0,
        "shutdown_timeout_s": 10.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def node_factory(tiny_artifact: Path, tmp_path: Path) -> Iterator[Callable[..., DicomNode]]:
    """Start in-process nodes (stopped at the end of the test)."""
    nodes: list[DicomNode] = []

    def make(destination: str, **overrides: Any) -> DicomNode:
        spool = overrides.pop("dimse_spool_dir", tmp_path / f"spool-{len(nodes)}")
        node = DicomNode(node_settings(tiny_artifact, spool, destination, **overrides))
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in nodes:
        node.stop(timeout_s=5.0)


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of the node's ``/metrics`` (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted((labels or {}).items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        series_name, _, label_text = series.partition("{")
        if series_name != name:
            continue
        found = ",".join(sorted(part for part in label_text.rstrip("}").split(",") if part))
        if found == wanted:
            return float(value)
    return 0.0


def spool_counts(spool: Path) -> dict[str, int]:
    return {
        "incoming": len(list((spool / "incoming").glob("*.dcm"))),
        "outbox": len([p for p in (spool / "outbox").iterdir() if p.is_dir()]),
        "quarantine": len(list((spool / "quarantine").glob("*.dcm"))),
        "failed": len([p for p in (spool / "failed").iterdir() if p.is_dir()]),
    }


def spool_empty(spool: Path) -> bool:
    counts = spool_counts(spool)
    return counts["incoming"] == 0 and counts["outbox"] == 0


# -- dcmtk as the camera -------------------------------------------------------------------------------


def dcmtk(binary: str | None, name: str) -> str:
    if binary is None:
        pytest.fail(f"{name} not found: apt-get install dcmtk")
    return binary


#: A camera's association profile: each photograph class in JPEG baseline, JPEG-LS, JPEG 2000 or
#: uncompressed, one presentation context per syntax, so every file goes in its own transfer syntax.
_PROFILE_SYNTAXES = {
    "JPEGBaseline": ["1.2.840.10008.1.2.4.50"],
    "JPEGLS": ["1.2.840.10008.1.2.4.80"],
    "JPEG2000": ["1.2.840.10008.1.2.4.90"],
    "Uncompressed": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
}
_PROFILE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
)


def storescu_profile(directory: Path) -> Path:
    """Write the storescu configuration file (profile ``Fundus``) and return its path."""
    lines = ["[[TransferSyntaxes]]"]
    for name, uids in _PROFILE_SYNTAXES.items():
        lines.append(f"[{name}]")
        lines += [f"TransferSyntax{index} = {uid}" for index, uid in enumerate(uids, 1)]
    lines += ["[[PresentationContexts]]", "[FundusContexts]"]
    number = 0
    for sop_class in _PROFILE_CLASSES:
        for name in _PROFILE_SYNTAXES:
            number += 1
            lines.append(f"PresentationContext{number} = {sop_class}\\{name}")
    lines += ["[[Profiles]]", "[Fundus]", "PresentationContexts = FundusContexts"]
    path = directory / "storescu-fundus.cfg"
    partial = directory / f".storescu-fundus.{os.getpid()}.{time.monotonic_ns()}.cfg"
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)  # atomic: concurrent senders never read a half-written profile
    return path


def _storescu_command(port: int, files: list[Path], calling: str, called: str) -> list[str]:
    profile = storescu_profile(files[0].parent)
    return [
        dcmtk(STORESCU, "storescu"),
        "-aet", calling, "-aec", called,
        "-xf", str(profile), "Fundus",
        "-to", "20", "-ta", "20", "-td", "60",
        "127.0.0.1", str(port), *map(str, files),
    ]  # fmt: skip


def storescu(
    port: int, files: list[Path], *, calling: str = CAMERA_AE, called: str = NODE_AE, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association with dcmtk's storescu, each file in its own transfer syntax."""
    command = _storescu_command(port, files, calling, called)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_storescu(port: int, files: list[Path], calling: str = CAMERA_AE) -> subprocess.Popen[str]:
    """:func:`storescu` in the background (for concurrent associations)."""
    command = _storescu_command(port, files, calling, NODE_AE)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def echoscu(
    port: int, *, calling: str = CAMERA_AE, called: str = NODE_AE
) -> subprocess.CompletedProcess[str]:
    command = [
        dcmtk(ECHOSCU, "echoscu"),
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "10",
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# -- the node as a separate process -------------------------------------------------------------------------


@dataclass
class NodeProcess:
    """``python -m service.cli dicom-node`` with the given FUNDUS_* environment."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def dimse_port(self) -> int:
        return int(self.env["FUNDUS_DIMSE_PORT"])

    @property
    def metrics_port(self) -> int:
        return int(self.env["FUNDUS_DIMSE_METRICS_PORT"])

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "dicom-node"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"dicom-node exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                return httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120.0, "the dicom-node process to report ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)


def node_environment(weights: Path, spool: Path, destination: str, **extra: str) -> dict[str, str]:
    env = {
        "FUNDUS_WEIGHTS": str(weights),
        "FUNDUS_DEVICE": "cpu",
        "FUNDUS_CPU_WORKERS": "1",
        "FUNDUS_TORCH_THREADS": "1",
        "FUNDUS_MAX_BATCH_SIZE": "4",
        "FUNDUS_MAX_BATCH_WAIT_MS": "2",
        "FUNDUS_WARMUP": "false",
        "FUNDUS_LOG_LEVEL": "INFO",
        "FUNDUS_DIMSE_AE_TITLE": NODE_AE,
        "FUNDUS_DIMSE_HOST": "127.0.0.1",
        "FUNDUS_DIMSE_PORT": str(free_port()),
        "FUNDUS_DIMSE_METRICS_PORT": str(free_port()),
        "FUNDUS_DIMSE_DESTINATION": destination,
        "FUNDUS_DIMSE_SPOOL_DIR": str(spool),
        "FUNDUS_DIMSE_RETRY_INITIAL_S": "0.2",
        "FUNDUS_DIMSE_RETRY_MAX_S": "1",
    }
    env.update(extra)
    return env


def patient_data_in(text: str, secrets: list[str]) -> list[str]:
    """Which of ``secrets`` (patient name, id, ...) appear in ``text`` (case-insensitive)."""
    return [secret for secret in secrets if re.search(re.escape(secret), text, re.IGNORECASE)]
