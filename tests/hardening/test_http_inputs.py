"""Hostile HTTP inputs get a clear JSON 4xx, never a 500, and errors never quote the upload."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from fastapi.testclient import TestClient

from tests.dicom.builders import Variant, make_dicom
from tests.service.conftest import encode, fundus_array

MARKER = "1.2.999.4242.31337"  # a made-up UID planted in the file
DICOM = {"content-type": "application/dicom"}


def test_a_multipart_boundary_over_256_characters_is_a_400(client: TestClient) -> None:
    boundary = "b" * 300
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + encode(fundus_array())
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for path in ("/enhance", "/segment", "/degrade"):
        response = client.post(
            path, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert response.status_code == 400, (path, response.status_code)
        assert response.json()["error"]["code"] == "bad_request"


def test_errors_never_quote_values_from_the_file(client: TestClient, fundus_rgb: np.ndarray) -> None:
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(fundus_rgb, Variant("sc", "RGB", "raw"))))
    dataset.SOPClassUID = MARKER
    dataset.file_meta.MediaStorageSOPClassUID = MARKER
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    response = client.post(
        "/enhance", content=buffer.getvalue(), headers={"content-type": "application/dicom"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "dicom_not_photograph"
    assert MARKER not in response.text and "31337" not in response.text
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
    dataset.PhotometricInterpretation = "MARKER_PI"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    response = client.post(
        "/enhance", content=buffer.getvalue(), headers={"content-type": "application/dicom"}
    )
    assert response.status_code == 415 and "MARKER_PI" not in response.text
