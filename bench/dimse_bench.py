"""DICOM node throughput and forward latency: N instances from K concurrent ``storescu`` associations.

Starts, on free loopback ports: Orthanc (its DICOM port is the destination), ``python -m service.cli
dicom-node`` (embedded queue, the given weights; a random-weight ``tiny`` artifact by default) and K
dcmtk ``storescu`` processes that send N Ophthalmic Photography instances (the bundled sample
photograph at the given size, uncompressed) in K associations at once. Waits until Orthanc holds every
derived instance and the node's spool is empty.

Reports: instances/s end to end (first C-STORE sent → last derived instance in Orthanc), the ingest
rate (C-STOREs acknowledged per second), and the forward latency per instance (C-STORE acknowledged →
the destination accepted its derived instance) as p50/p99/max, read from the node's own ``item
delivered`` log lines; plus the node's counters as a cross-check.

    python bench/dimse_bench.py                           # 50 instances, 4 associations, 128×96, tiny
    python bench/dimse_bench.py --count 200 --associations 8 --size 512x384 \
        --weights model/weights/tmagenet-lite.safetensors
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, OphthalmicPhotography8BitImageStorage, generate_uid  # noqa: E402

SAMPLE = REPO_ROOT / "service" / "samples" / "hrf-06_h.jpg"
ORTHANC = "/usr/sbin/Orthanc"
NODE_AE, CAMERA_AE, PACS_AE = "FUNDUSNODE", "CAMERA1", "ORTHANC"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling period


def photograph(size: tuple[int, int]) -> np.ndarray:
    with Image.open(SAMPLE) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)).copy()


def instance(rgb: np.ndarray, study: str, series: str, number: int) -> bytes:
    """An uncompressed Ophthalmic Photography 8 Bit instance of ``rgb``."""
    ds = Dataset()
    ds.SOPClassUID = OphthalmicPhotography8BitImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Patient", "BENCH-1", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OP", 1, number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Laterality = ds.ImageLaterality = "R"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def tiny_weights(directory: Path) -> Path:
    import torch

    from model.artifact import save_artifact
    from model.magenet import MageNet
    from model.presets import get_preset

    torch.manual_seed(0)
    path = directory / "tiny.safetensors"
    save_artifact(
        path, MageNet(get_preset("tiny")), preset="tiny", training={"note": "random weights (bench)"}
    )
    return path


def start_orthanc(root: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    http_port, dicom_port = free_port(), free_port()
    storage = root / "orthanc"
    storage.mkdir()
    config = {
        "Name": "bench-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": True, "DicomAet": PACS_AE, "DicomPort": dicom_port,
        "DicomAlwaysAllowStore": True, "Plugins": [], "StorageCompression": False, "ConcurrentJobs": 1,
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "Orthanc")
    return process, base, dicom_port


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def node_metric(port: int, name: str, label: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name}{label} ") or (not label and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def dcmtk_storescu() -> str | None:
    """dcmtk's ``storescu``: pynetdicom installs a console script of the same name, with other options,
    beside the interpreter, and an activated virtual environment puts it first on PATH."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    path = os.environ.get("PATH", "").split(os.pathsep)
    elsewhere = [d for d in path if d and Path(d).resolve() != scripts]
    return shutil.which("storescu", path=os.pathsep.join(elsewhere))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=50, help="instances to send")
    parser.add_argument("--associations", type=int, default=4, help="concurrent storescu associations")
    parser.add_argument("--size", default="128x96", help="photograph width x height")
    parser.add_argument("--weights", help="weight artifact (default: a random-weight tiny preset)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args()
    storescu_binary = dcmtk_storescu()
    if storescu_binary is None:
        sys.exit("storescu not found: apt-get install dcmtk")
    if not Path(ORTHANC).exists():
        sys.exit("Orthanc not found: apt-get install orthanc")
    width, height = (int(v) for v in args.size.lower().split("x"))

    root = Path(tempfile.mkdtemp(prefix="dimse-bench-"))
    orthanc, pacs_url, pacs_port = start_orthanc(root)
    node: subprocess.Popen[bytes] | None = None
    try:
        weights = Path(args.weights) if args.weights else tiny_weights(root)
        rgb = photograph((width, height))
        study, series = generate_uid(), generate_uid()
        files = []
        for index in range(args.count):
            path = root / "in" / f"{index:04d}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(instance(rgb, study, series, index + 1))
            files.append(path)

        dimse_port, metrics_port = free_port(), free_port()
        spool = root / "spool"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "FUNDUS_WEIGHTS": str(weights), "FUNDUS_DEVICE": "cpu", "FUNDUS_LOG_LEVEL": "INFO",
            "FUNDUS_DIMSE_AE_TITLE": NODE_AE, "FUNDUS_DIMSE_HOST": "127.0.0.1",
            "FUNDUS_DIMSE_PORT": str(dimse_port), "FUNDUS_DIMSE_METRICS_PORT": str(metrics_port),
            "FUNDUS_DIMSE_DESTINATION": f"{PACS_AE}@127.0.0.1:{pacs_port}",
            "FUNDUS_DIMSE_SPOOL_DIR": str(spool),
        }  # fmt: skip
        node_log = root / "node.log"
        with node_log.open("wb") as log:
            node = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "dicom-node"], cwd=REPO_ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready() -> bool:
            assert node is not None
            if node.poll() is not None:
                raise RuntimeError(f"dicom-node exited: {node_log.read_text()[-2000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "the node")

        groups = [files[index :: args.associations] for index in range(args.associations)]
        started = time.perf_counter()
        storescu = [storescu_binary, "-aet", CAMERA_AE, "-aec", NODE_AE, "127.0.0.1", str(dimse_port)]
        senders = [
            subprocess.Popen([*storescu, *map(str, group)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for group in groups
            if group
        ]
        for sender in senders:
            output, _ = sender.communicate(timeout=args.timeout)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {output.decode(errors='replace')[-2000:]}")
        ingested_s = time.perf_counter() - started

        def delivered() -> bool:
            count = len(httpx.get(f"{pacs_url}/instances", timeout=10).json())
            return count >= args.count

        wait_for(delivered, args.timeout, "every derived instance in Orthanc")
        wall_s = time.perf_counter() - started
        wait_for(lambda: not list((spool / "outbox").iterdir()), 30, "the outbox to drain")

        latencies = []
        for line in node_log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "item delivered":
                    latencies.append(float(entry["latency_s"]))
        result = {
            "scenario": {
                "instances": args.count,
                "associations": args.associations,
                "image": f"{width}x{height}",
                "transfer_syntax": "explicit VR little endian",
                "weights": "random tiny" if not args.weights else Path(args.weights).name,
                "queue": "embedded",
                "cpu_cores": os.cpu_count(),
                "python": platform.python_version(),
            },
            "instances_per_s": round(args.count / wall_s, 2),
            "ingest_instances_per_s": round(args.count / ingested_s, 2),
            "wall_s": round(wall_s, 3),
            "forward_latency_s": {
                "p50": round(percentile(latencies, 50), 3),
                "p99": round(percentile(latencies, 99), 3),
                "max": round(max(latencies), 3) if latencies else None,
                "samples": len(latencies),
            },
            "node_counters": {
                "received": node_metric(metrics_port, "fundus_dimse_received_total"),
                "forwarded_enhanced": node_metric(
                    metrics_port, "fundus_dimse_forwarded_total", '{kind="enhanced"}'
                ),
                "mean_batch_size": round(
                    node_metric(metrics_port, "fundus_batch_size_sum")
                    / max(node_metric(metrics_port, "fundus_batch_size_count"), 1),
                    2,
                ),
            },
            "all_forwarded": len(latencies) == args.count,
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if node is not None and node.poll() is None:
            node.terminate()
            node.wait(timeout=60)
        orthanc.kill()
        orthanc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
