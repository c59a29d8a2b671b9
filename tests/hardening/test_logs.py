"""A real ``fundus serve`` fed hostile uploads: every line it writes is JSON, and nothing planted in
an upload (names, character sets, UIDs, file names) appears in its output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pydicom

from tests.dicom.builders import Variant, make_dicom
from tests.ops.monitoring import clean_environment, fundus_process, wait_ready
from tests.ops.support import free_port
from tests.service.conftest import encode, fundus_array

MARKERS = ("ZZMARKERNAME", "ZZMARKERCHARSET", "ZZMARKERFILE", "1.2.999.77.31337")


def _dicom_with(fundus_rgb: np.ndarray, **values: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))))
    for key, value in values.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_every_line_is_json_and_free_of_upload_values(
    tmp_path: Path, tiny_artifact: Path, fundus_rgb: np.ndarray
) -> None:
    port = free_port()
    env = clean_environment(
        FUNDUS_WEIGHTS=str(tiny_artifact), FUNDUS_PORT=str(port), FUNDUS_HOST="127.0.0.1",
        FUNDUS_DEVICE="cpu", FUNDUS_WARMUP="false", FUNDUS_TORCH_THREADS="1", FUNDUS_LOG_LEVEL="DEBUG",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    dicom = {"content-type": "application/dicom"}
    with fundus_process("serve", env, tmp_path) as process:
        wait_ready(base, process, tmp_path / "serve.log", timeout_s=120)
        uploads = [
            # An unknown character set: pydicom warns and quotes it.
            (
                _dicom_with(fundus_rgb, SpecificCharacterSet="ZZMARKERCHARSET", PatientName="ZZMARKERNAME"),
                dicom,
            ),
            (_dicom_with(fundus_rgb, SOPClassUID="1.2.999.77.31337"), dicom),
            (_dicom_with(fundus_rgb, PatientName="ZZMARKERNAME")[:600], dicom),  # truncated
        ]
        for body, headers in uploads:
            for path in ("/enhance", "/segment"):
                response = httpx.post(f"{base}{path}", content=body, headers=headers, timeout=60)
                assert response.status_code < 500, response.text
                if response.status_code >= 400:  # a derived DICOM rightly keeps the patient module
                    assert not any(marker in response.text for marker in MARKERS), response.text
        files = {"file": ("ZZMARKERFILE.png", encode(fundus_array()), "image/png")}
        assert httpx.post(f"{base}/enhance", files=files, timeout=60).status_code == 200
        broken = {"file": ("ZZMARKERFILE.png", b"\x89PNG\r\n\x1a\nZZMARKERNAME", "image/png")}
        assert httpx.post(f"{base}/enhance", files=broken, timeout=60).status_code == 415
    lines = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line is JSON
        assert isinstance(record, dict) and "level" in record
        assert not any(marker in line for marker in MARKERS), line
    library = [json.loads(line) for line in lines if json.loads(line).get("msg") == "library warning"]
    assert library, "the character-set warning should have been logged (as a library warning)"
    assert all("request_id" in record for record in library)
