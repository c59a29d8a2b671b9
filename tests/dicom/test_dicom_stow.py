"""STOW-RS against a real Orthanc, read back through QIDO-RS and WADO-RS; outcome classification."""

from __future__ import annotations

import asyncio
import io
import logging
import socket

import httpx
import numpy as np
import pydicom
import pytest

from service.dicom.provenance import Provenance
from service.dicom.reader import read_dicom
from service.dicom.segmentation import write_vessel_segmentation
from service.dicom.stow import interpret_response, multipart_related, stow_rs
from service.dicom.writer import write_enhanced
from tests.dicom.builders import PATIENT_ID, PATIENT_NAME, STUDY_UID, Variant, make_dicom
from tests.dicom.conftest import OrthancServer

pytestmark = pytest.mark.integration

PROVENANCE = Provenance("T-MAGE-Net", "tiny-0123456789ab")
DICOM_JSON = {"Accept": "application/dicom+json"}


def qido(orthanc: OrthancServer, path: str, **params: str) -> list[dict]:
    response = httpx.get(f"{orthanc.dicomweb_root}{path}", params=params, headers=DICOM_JSON, timeout=10)
    assert response.status_code == 200, response.text[:200]
    return response.json() if response.content else []


def wado_instances(orthanc: OrthancServer, path: str) -> list[pydicom.Dataset]:
    """WADO-RS retrieve: multipart/related application/dicom parts → datasets."""
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    response = httpx.get(f"{orthanc.dicomweb_root}{path}", headers=accept, timeout=10)
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    boundary = next(
        p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")
    )
    datasets = []
    for part in response.content.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        datasets.append(pydicom.dcmread(io.BytesIO(payload.removesuffix(b"\r\n"))))
    return datasets


def _value(item: dict, tag: str) -> object:
    return item[tag]["Value"][0]


def test_stow_enhanced_and_segmentation_then_read_back(
    orthanc: OrthancServer, fundus_rgb: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "YBR_FULL_422", "jpeg")))
    enhanced_pixels = np.ascontiguousarray(255 - photo.pixels)
    enhanced = write_enhanced(photo.dataset, enhanced_pixels, PROVENANCE)
    vessels = write_vessel_segmentation(photo.dataset, photo.pixels[:, :, 1].copy(), PROVENANCE)

    caplog.set_level(logging.DEBUG, logger="fundus")
    outcome = asyncio.run(stow_rs(orthanc.dicomweb_root, [enhanced.data, vessels.data]))
    assert outcome.status == "stored", outcome
    assert outcome.http_status == 200
    assert {item.sop_instance_uid for item in outcome.stored} == {
        enhanced.sop_instance_uid,
        vessels.sop_instance_uid,
    }
    assert outcome.header_value() == "stored; http=200; stored=2; failed=0"
    assert "Müller" not in caplog.text and PATIENT_ID not in caplog.text

    # QIDO-RS: the study now has the derived series, under the same patient.
    series = qido(orthanc, f"/studies/{STUDY_UID}/series")
    by_uid = {_value(item, "0020000E"): item for item in series}
    assert enhanced.series_instance_uid in by_uid and vessels.series_instance_uid in by_uid
    assert "Enhanced" in str(_value(by_uid[enhanced.series_instance_uid], "0008103E"))
    studies = qido(orthanc, "/studies", StudyInstanceUID=STUDY_UID)
    assert _value(studies[0], "00100020") == PATIENT_ID
    assert _value(studies[0], "00100010") == {"Alphabetic": PATIENT_NAME}
    instances = qido(orthanc, f"/studies/{STUDY_UID}/series/{enhanced.series_instance_uid}/instances")
    assert [_value(item, "00080018") for item in instances] == [enhanced.sop_instance_uid]

    # WADO-RS: the stored instance is the one sent, pixels included.
    path = f"/studies/{STUDY_UID}/series/{enhanced.series_instance_uid}/instances/{enhanced.sop_instance_uid}"
    (stored,) = wado_instances(orthanc, path)
    assert stored.SOPInstanceUID == enhanced.sop_instance_uid
    assert str(stored.PatientName) == PATIENT_NAME and stored.PatientID == PATIENT_ID
    assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == photo.dataset.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, enhanced_pixels)
    (seg,) = wado_instances(orthanc, f"/studies/{STUDY_UID}/series/{vessels.series_instance_uid}")
    assert np.array_equal(seg.pixel_array, photo.pixels[:, :, 1])


def test_stow_partial_when_some_parts_are_refused(orthanc: OrthancServer, fundus_rgb: np.ndarray) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("sc", "RGB", "raw")))
    good = write_enhanced(photo.dataset, photo.pixels, PROVENANCE)
    outcome = asyncio.run(stow_rs(orthanc.dicomweb_root, [good.data, b"not a dicom file" * 20]))
    assert outcome.status == "partial", outcome
    assert [item.sop_instance_uid for item in outcome.stored] == [good.sop_instance_uid]
    assert not outcome.ok and outcome.header_value().startswith("partial;")


def test_stow_failed_when_study_does_not_match(orthanc: OrthancServer, fundus_rgb: np.ndarray) -> None:
    photo = read_dicom(make_dicom(fundus_rgb, Variant("op", "RGB", "raw")))
    derived = write_enhanced(photo.dataset, photo.pixels, PROVENANCE)
    outcome = asyncio.run(stow_rs(orthanc.dicomweb_root, [derived.data], study_instance_uid="1.2.3.4"))
    assert outcome.status == "failed", outcome
    assert outcome.http_status is not None and outcome.http_status >= 400
    assert [item.sop_instance_uid for item in outcome.failed] == [derived.sop_instance_uid]
    assert outcome.failed[0].reason is not None


def test_stow_unreachable_pacs(fundus_rgb: np.ndarray) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = asyncio.run(stow_rs(f"http://127.0.0.1:{port}/dicom-web", [b"x"], timeout_s=2.0))
    assert outcome.status == "unreachable" and outcome.http_status is None
    assert outcome.header_value() == "unreachable; http=none; stored=0; failed=0"


def test_stow_http_error_without_body_is_failed() -> None:
    outcome = interpret_response(503, b"<html>busy</html>", 1)
    assert outcome.status == "failed" and outcome.http_status == 503


def test_stow_plain_200_without_body_is_stored() -> None:
    assert interpret_response(200, b"", 2).status == "stored"


def test_stow_empty_response_lists_mean_nothing_stored() -> None:
    body = b'{"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}'
    assert interpret_response(200, body, 1).status == "failed"


def test_stow_warnings_only_is_stored() -> None:
    body = (
        b'{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]},'
        b' "00081196": {"vr": "US", "Value": [45056]}}]}}'
    )
    outcome = interpret_response(202, body, 1)
    assert outcome.status == "stored" and outcome.stored[0].reason == 0xB000
    assert outcome.as_json()["stored"][0]["reason"] == "0xB000"


def test_multipart_related_body_layout() -> None:
    body, content_type = multipart_related([b"AAA", b"BB"], boundary="xyz")
    assert content_type == 'multipart/related; type="application/dicom"; boundary=xyz'
    assert body == (
        b"--xyz\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n"
        b"--xyz\r\nContent-Type: application/dicom\r\n\r\nBB\r\n--xyz--\r\n"
    )
