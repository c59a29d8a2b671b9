"""API keys, metrics exposition, start-up errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import StartupError, create_app
from service.settings import Settings
from tests.service.conftest import encode, fundus_array

PNG = {"content-type": "image/png"}
DESIGN_METRICS = (
    "fundus_requests_total",
    "fundus_request_duration_seconds",
    "fundus_queue_wait_seconds",
    "fundus_batch_size",
    "fundus_inference_duration_seconds",
    "fundus_queue_depth",
    "fundus_rejected_total",
    "fundus_model_info",
)


def test_auth_on(make_settings: Callable[..., Settings]) -> None:
    body = encode(fundus_array())
    with TestClient(create_app(make_settings(api_keys="first-key, second-key"))) as client:
        missing = client.post("/enhance", content=body, headers=PNG)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/segment", content=body, headers=PNG | {"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (
            client.post("/degrade?seed=1", content=body, headers=PNG | {"x-api-key": "first"}).status_code
            == 401
        )
        bearer = client.post("/enhance", content=body, headers=PNG | {"authorization": "Bearer second-key"})
        assert bearer.status_code == 200
        header = client.post("/segment", content=body, headers=PNG | {"x-api-key": "first-key"})
        assert header.status_code == 200
        # Public: the health probes and the API description; /metrics unless FUNDUS_METRICS_AUTH.
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/metrics"):
            assert client.get(path).status_code == 200, path
        assert client.get("/model").status_code == 401
        described = client.get("/model", headers={"x-api-key": "first-key"})
        assert described.status_code == 200
        assert "hardware" not in json.dumps(described.json()) and "platform" not in json.dumps(
            described.json()
        )


def test_auth_off_by_default(client: TestClient) -> None:
    response = client.post("/enhance", content=encode(fundus_array()), headers=PNG)
    assert response.status_code == 200


def test_metrics_auth_optional(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(api_keys="k", metrics_auth=True))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"x-api-key": "k"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_metrics_names_and_labels(client: TestClient) -> None:
    assert client.post("/enhance", content=encode(fundus_array()), headers=PNG).status_code == 200
    assert client.post("/enhance", content=b"nope", headers=PNG).status_code == 415
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in DESIGN_METRICS:
        assert f"# TYPE {name} " in text, name
    assert 'fundus_requests_total{endpoint="/enhance",status="200"}' in text
    assert 'fundus_rejected_total{reason="content_mismatch"}' in text
    assert 'preset="tiny"' in text and 'device="cpu"' in text
    assert 'fundus_request_duration_seconds_bucket{endpoint="/enhance",le="0.001"}' in text
    assert 'le="30.0"' in text


def test_missing_weights_fail_start_up_clearly(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    app = create_app(make_settings(weights=tmp_path / "absent.safetensors"))
    with pytest.raises(StartupError, match="not found"), TestClient(app):
        pass


def test_unknown_device_fails_start_up_naming_the_setting(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(device="tpu"))
    with pytest.raises(StartupError, match="FUNDUS_DEVICE: unknown device 'tpu'"), TestClient(app):
        pass


def test_corrupt_weights_fail_start_up_clearly(
    make_settings: Callable[..., Settings], tiny_artifact: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_artifact.read_bytes()[:-100])
    app = create_app(make_settings(weights=broken))
    with pytest.raises(StartupError, match="cannot load weights"), TestClient(app):
        pass


def test_serve_command_refuses_missing_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from service.commands.serve import run

    monkeypatch.setenv("FUNDUS_WEIGHTS", str(tmp_path / "none.safetensors"))
    args = argparse.Namespace(host=None, port=None, workers=None, weights=None, device=None)
    assert run(args) == 2
    assert "weights file not found" in capsys.readouterr().err


def test_logs_are_json_with_request_id_and_no_file_names(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from service.logging import JsonFormatter

    caplog.set_level(logging.INFO, logger="fundus")
    name = "Doe_John_19700101_left_eye.png"
    response = client.post(
        "/enhance",
        files={"file": (name, encode(fundus_array()), "image/png")},
        headers={"x-request-id": "req-42"},
    )
    assert response.status_code == 200
    lines = [JsonFormatter().format(record) for record in caplog.records]
    entries = [json.loads(line) for line in lines]
    access = [e for e in entries if e["msg"] == "request" and e.get("request_id") == "req-42"]
    assert access and access[0]["status"] == 200 and access[0]["endpoint"] == "/enhance"
    assert all("Doe_John" not in line for line in lines)
