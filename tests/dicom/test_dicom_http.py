"""DICOM through the HTTP service: derived instances back, clear 415/422 refusals, PACS store answers."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi import FastAPI, Query, Request, Response
from fastapi.testclient import TestClient
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, SegmentationStorage

from service.app import create_app
from service.dicom.pacs import STORE_HEADER, respond_with_store
from service.errors import install_error_handlers
from service.settings import Settings
from tests.dicom.builders import PATIENT_NAME, STUDY_UID, Variant, make_dicom
from tests.dicom.conftest import OrthancServer, dciodvfy_errors
from tests.dicom.test_dicom_reader import SECRET_NAME, _multiframe, _structured_report

DICOM = "application/dicom"


def _settings(weights: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "weights": weights,
        "device": "cpu",
        "max_batch_size": 2,
        "max_batch_wait_ms": 2.0,
        "request_timeout_s": 60.0,
        "api_keys": "",
        "redis_url": None,
        "cpu_workers": 1,
        "log_level": "WARNING",
        "dicomweb_url": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tiny_artifact))) as test_client:
        yield test_client


def _post(client: TestClient, path: str, data: bytes, **params: str) -> httpx.Response:
    return client.post(path, content=data, headers={"Content-Type": DICOM}, params=params)


def test_enhance_dicom_returns_valid_derived_instance(
    client: TestClient, fundus_rgb: np.ndarray, tmp_path: Path
) -> None:
    upload = make_dicom(fundus_rgb, Variant("op", "YBR_FULL_422", "jpeg"))
    source = pydicom.dcmread(io.BytesIO(upload))
    response = _post(client, "/enhance", upload)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith(DICOM)
    assert dciodvfy_errors(response.content, tmp_path) == []
    derived = pydicom.dcmread(io.BytesIO(response.content))
    assert derived.SOPClassUID == SecondaryCaptureImageStorage
    assert derived.StudyInstanceUID == STUDY_UID and str(derived.PatientName) == PATIENT_NAME
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    model_version = response.headers["X-Model-Version"]
    assert model_version in list(derived.ContributingEquipmentSequence[0].SoftwareVersions)
    assert derived.pixel_array.shape == fundus_rgb.shape


def test_enhance_dicom_can_answer_png(client: TestClient, fundus_rgb: np.ndarray) -> None:
    response = _post(
        client, "/enhance", make_dicom(fundus_rgb, Variant("sc", "MONOCHROME2", "j2k")), format="png"
    )
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/png"


def test_segment_dicom_returns_segmentation(
    client: TestClient, fundus_rgb: np.ndarray, tmp_path: Path
) -> None:
    upload = make_dicom(fundus_rgb, Variant("op", "RGB", "jpegls"))
    response = _post(client, "/segment", upload, format="dicom", threshold="0.5")
    assert response.status_code == 200, response.text[:300]
    assert dciodvfy_errors(response.content, tmp_path) == []
    seg = pydicom.dcmread(io.BytesIO(response.content))
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == fundus_rgb.shape[:2]


def test_png_upload_cannot_answer_dicom(client: TestClient, fundus_rgb: np.ndarray) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(fundus_rgb).save(buffer, "PNG")
    response = client.post(
        "/enhance?format=dicom", content=buffer.getvalue(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 400
    assert "DICOM upload" in response.json()["error"]["message"]


def _broken(rgb: np.ndarray) -> bytes:
    return make_dicom(rgb, Variant("op", "RGB", "raw"), patient_name=SECRET_NAME)[:-3000]


BAD_UPLOADS = {
    "structured-report": (lambda rgb: _structured_report(), 422, "dicom_not_image"),
    "multiframe": (_multiframe, 422, "dicom_multiframe"),
    "broken": (_broken, 415, "dicom_truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_dicom_gets_json_error_without_patient_data(
    client: TestClient, fundus_rgb: np.ndarray, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, status, code = BAD_UPLOADS[case]
    response = _post(client, "/enhance", build(fundus_rgb))
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == code
    secret = SECRET_NAME.split("^")[0]
    assert secret not in response.text and secret not in caplog.text


def _store_app(dicomweb_url: str | None) -> FastAPI:
    """The store hook behind a minimal route, as the image routes call it."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/result")
    async def result(
        request: Request, store: bool | None = Query(None), report: str = Query("file")
    ) -> Response:
        body = await request.body()
        return await respond_with_store(
            body, DICOM, {"X-Model-Version": "v"}, dicomweb_url=dicomweb_url, store=store, report=report
        )

    return app


def _derived_bytes(rgb: np.ndarray) -> bytes:
    from service.dicom.provenance import Provenance
    from service.dicom.reader import read_dicom
    from service.dicom.writer import write_enhanced

    photo = read_dicom(make_dicom(rgb, Variant("op", "RGB", "raw")))
    return write_enhanced(photo.dataset, photo.pixels, Provenance("T-MAGE-Net", "tiny-0123")).data


@pytest.mark.integration
def test_store_hook_stores_and_reports(orthanc: OrthancServer, fundus_rgb: np.ndarray) -> None:
    data = _derived_bytes(fundus_rgb)
    with TestClient(_store_app(orthanc.dicomweb_root)) as hook:
        response = hook.post("/result", content=data)
        assert response.status_code == 200
        assert response.headers[STORE_HEADER] == "stored; http=200; stored=1; failed=0"
        assert response.content == data
        report = hook.post("/result?report=json", content=_derived_bytes(fundus_rgb)).json()
        assert report["store"]["status"] == "stored"
        uid = report["result"]["sop_instance_uid"]
        assert [item["sop_instance_uid"] for item in report["store"]["stored"]] == [uid]
        assert PATIENT_NAME.split("^")[0] not in str(report)
        skipped = hook.post("/result?store=false", content=data)
        assert skipped.status_code == 200 and STORE_HEADER not in skipped.headers


def test_store_hook_pacs_failure_is_502_with_result(fundus_rgb: np.ndarray) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    data = _derived_bytes(fundus_rgb)
    with TestClient(_store_app(dead_url)) as hook:
        response = hook.post("/result", content=data)
        assert response.status_code == 502
        assert response.headers[STORE_HEADER].startswith("unreachable;")
        assert response.headers["X-Error-Code"] == "pacs_store_failed"
        assert response.content == data  # the result is not lost
        report = hook.post("/result?report=json", content=data)
        assert report.status_code == 502
        body = report.json()
        assert body["error"]["code"] == "pacs_store_failed" and body["store"]["status"] == "unreachable"
        import base64

        assert base64.b64decode(body["result"]["data_base64"]) == data


def test_store_hook_refuses_store_without_endpoint(fundus_rgb: np.ndarray) -> None:
    with TestClient(_store_app(None)) as hook:
        response = hook.post("/result?store=true", content=_derived_bytes(fundus_rgb))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "store_unavailable"
        plain = hook.post("/result", content=b"x")
        assert plain.status_code == 200 and STORE_HEADER not in plain.headers


def _route_has_store(client: TestClient) -> bool:
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/enhance"]["post"].get("parameters", [])
    return any(p["name"] == "store" for p in params)


@pytest.mark.integration
def test_enhance_store_true_pushes_to_orthanc(
    tiny_artifact: Path, orthanc: OrthancServer, fundus_rgb: np.ndarray
) -> None:
    settings = _settings(tiny_artifact, dicomweb_url=orthanc.dicomweb_root)
    with TestClient(create_app(settings)) as app_client:
        if not _route_has_store(app_client):
            pytest.skip("the image routes do not take store= yet")
        upload = make_dicom(fundus_rgb, Variant("sc", "RGB", "raw"))
        response = app_client.post(
            "/enhance?store=true",
            content=upload,
            headers={"Content-Type": DICOM, "Accept": f"{DICOM}; transfer-syntax={JPEGBaseline8Bit}"},
        )
        assert response.status_code == 200, response.text[:300]
        assert response.headers[STORE_HEADER].startswith("stored;")
        derived = pydicom.dcmread(io.BytesIO(response.content))
        assert derived.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        found = httpx.get(
            f"{orthanc.dicomweb_root}/studies/{STUDY_UID}/series/{derived.SeriesInstanceUID}/instances",
            headers={"Accept": "application/dicom+json"},
            timeout=10,
        ).json()
        assert derived.SOPInstanceUID in [item["00080018"]["Value"][0] for item in found]


def test_enhance_store_with_pacs_down_is_502_with_result(tiny_artifact: Path, fundus_rgb: np.ndarray) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
    with TestClient(create_app(_settings(tiny_artifact, dicomweb_url=dead_url))) as app_client:
        if not _route_has_store(app_client):
            pytest.skip("the image routes do not take store= yet")
        upload = make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))
        response = _post(app_client, "/enhance", upload)
        assert response.status_code == 502
        assert response.headers[STORE_HEADER].startswith("unreachable;")
        derived = pydicom.dcmread(io.BytesIO(response.content))  # the result is still returned
        assert derived.StudyInstanceUID == STUDY_UID
        vessels = _post(app_client, "/segment", upload, store="false")
        assert vessels.status_code == 200 and STORE_HEADER not in vessels.headers
        assert pydicom.dcmread(io.BytesIO(vessels.content)).SOPClassUID == SegmentationStorage
        refused = _post(app_client, "/enhance", upload, store="true", format="png")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "store_needs_dicom"


@pytest.mark.integration
def test_degrade_never_reaches_the_pacs_by_default_and_is_flagged_synthetic(
    tiny_artifact: Path, orthanc: OrthancServer, fundus_rgb: np.ndarray
) -> None:
    """With FUNDUS_DICOMWEB_URL set, /enhance stores by default but /degrade does not: a degraded copy
    goes to the archive only with store=true, in its own series, marked as synthetic test data."""
    settings = _settings(tiny_artifact, dicomweb_url=orthanc.dicomweb_root)
    upload = make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))

    def series_in_study() -> set[str]:
        found = httpx.get(
            f"{orthanc.dicomweb_root}/studies/{STUDY_UID}/series",
            headers={"Accept": "application/dicom+json"},
        )
        return {item["0020000E"]["Value"][0] for item in found.json()} if found.content else set()

    with TestClient(create_app(settings)) as app_client:
        before = series_in_study()
        response = _post(app_client, "/degrade", upload, seed="4")
        assert response.status_code == 200 and STORE_HEADER not in response.headers
        degraded = pydicom.dcmread(io.BytesIO(response.content))
        assert list(degraded.ImageType)[:4] == ["DERIVED", "SECONDARY", "SYNTHETIC", "DEGRADED"]
        assert degraded.SeriesDescription.startswith("SYNTHETIC TEST DATA")
        assert series_in_study() == before  # nothing reached the PACS
        stored = _post(app_client, "/degrade", upload, seed="4", store="true")
        assert stored.status_code == 200 and stored.headers[STORE_HEADER].startswith("stored;")
        copy = pydicom.dcmread(io.BytesIO(stored.content))
        assert copy.SeriesInstanceUID not in before and copy.SeriesInstanceUID != upload_series(upload)
        assert series_in_study() == before | {copy.SeriesInstanceUID}


def upload_series(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID)
