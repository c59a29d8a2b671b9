"""Round trips and every client mistake over HTTP against the real app (tiny weights, embedded queue)."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import decode, encode, fundus_array


def png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR announces ``width × height`` (8-bit RGB) with the given (possibly bogus) IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_enhance_raw_png_keeps_geometry_and_headers(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/enhance", content=png_bytes, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).size == (160, 120)
    assert response.headers["x-model-version"].startswith("tiny-")
    timing = response.headers["server-timing"]
    assert "queue;dur=" in timing and "inference;dur=" in timing
    assert len(response.headers["x-request-id"]) >= 16


def test_enhance_multipart_jpeg_odd_size(client: TestClient) -> None:
    jpeg = encode(fundus_array(201, 143), "JPEG", quality=90)
    response = client.post("/enhance", files={"file": ("eye.jpg", jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert decode(response.content).size == (201, 143)


def test_real_fundus_photograph_round_trip(client: TestClient, data_root: Path) -> None:
    path = sorted((data_root / "deepdrid" / "images").glob("*.jpg"))[0]
    data = path.read_bytes()
    response = client.post("/enhance?format=jpeg", content=data, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    import io

    from PIL import Image

    assert decode(response.content).size == Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(
    ("query", "accept", "media", "pil_format"),
    [
        ("", None, "image/png", "PNG"),
        ("?format=jpeg", None, "image/jpeg", "JPEG"),
        ("?format=tiff", "image/jpeg", "image/tiff", "TIFF"),
        ("", "image/tiff", "image/tiff", "TIFF"),
        ("", "text/html;q=0.9, image/jpeg;q=0.5, */*;q=0.1", "image/jpeg", "JPEG"),
        ("", "*/*", "image/png", "PNG"),
    ],
)
def test_output_format_by_query_or_accept(
    client: TestClient, png_bytes: bytes, query: str, accept: str | None, media: str, pil_format: str
) -> None:
    headers = {"content-type": "image/png"} | ({"accept": accept} if accept else {})
    response = client.post(f"/enhance{query}", content=png_bytes, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    image = decode(response.content)
    assert image.format == pil_format and image.size == (160, 120)


def test_unacceptable_accept_is_406(client: TestClient, png_bytes: bytes) -> None:
    response = client.post(
        "/enhance", content=png_bytes, headers={"content-type": "image/png", "accept": "image/gif"}
    )
    assert_error(response, 406, "not_acceptable")


def test_output_size_model_returns_working_crop(client: TestClient, png_bytes: bytes) -> None:
    response = client.post(
        "/enhance?output_size=model", content=png_bytes, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200
    assert decode(response.content).size == (64, 64)


def test_segment_probability_and_threshold(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/segment", content=png_bytes, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    image = decode(response.content)
    assert image.mode == "L" and image.size == (160, 120)
    assert "inference;dur=" in response.headers["server-timing"]
    binary = client.post("/segment?threshold=0.5", files={"file": ("a.png", png_bytes, "image/png")})
    assert binary.status_code == 200
    values = set(np.unique(np.asarray(decode(binary.content))).tolist())
    assert values <= {0, 255}
    assert decode(binary.content).size == (160, 120)


def test_degrade_is_reproducible_by_seed(client: TestClient, png_bytes: bytes) -> None:
    def call(seed: int) -> tuple[bytes, dict]:
        response = client.post(
            f"/degrade?seed={seed}&types=illumination,blur",
            content=png_bytes,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200, response.text
        return response.content, json.loads(response.headers["x-degradation-params"])

    first, params = call(7)
    again, params_again = call(7)
    other, _ = call(8)
    assert first == again
    assert params == params_again and params["seed"] == 7
    assert first != other
    assert decode(first).size == (160, 120)


def test_request_id_echoed_or_replaced(client: TestClient) -> None:
    echoed = client.get("/healthz", headers={"x-request-id": "abc-123.XY"})
    assert echoed.headers["x-request-id"] == "abc-123.XY"
    replaced = client.get("/healthz", headers={"x-request-id": "bad id<script>" + "x" * 200})
    assert (
        replaced.headers["x-request-id"] != "bad id<script>" and len(replaced.headers["x-request-id"]) == 32
    )
    assert replaced.headers["x-model-version"].startswith("tiny-")


def test_health_ready_model_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/model").json()
    assert info["preset"] == "tiny" and info["working_size"] == 64 and info["parameter_count"] > 0
    assert len(info["sha256"]) == 64
    spec = client.get("/openapi.json").json()
    for path in ("/enhance", "/segment", "/degrade", "/model", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"]
    body = spec["paths"]["/enhance"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "image/tiff", "application/dicom"} <= set(body)
    assert spec["components"]["schemas"]["ModelResponse"]["examples"]


TEXT = b"this is not an image, just some text\n" * 4


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "empty_body"),
        (encode(fundus_array())[:200], "image/png", 415, "undecodable"),
        (TEXT, "image/png", 415, "content_mismatch"),
        (TEXT, "text/plain", 415, "unsupported_media_type"),
        (TEXT, "application/octet-stream", 415, "unsupported_media_type"),
        (encode(fundus_array()), "image/jpeg", 415, "content_mismatch"),
        (encode(fundus_array()), "application/json", 415, "unsupported_media_type"),
        (png_with_header(0, 0), "image/png", 415, None),
        (encode(np.full((1, 300, 3), 120, dtype=np.uint8)), "image/png", 422, "image_too_small"),
        (encode(np.zeros((120, 160, 3), dtype=np.uint8)), "image/png", 422, "no_fundus"),
        (encode(np.full((120, 160, 3), 128, dtype=np.uint8)), "image/png", 422, "no_fundus"),
        (png_with_header(200_000, 200_000, zlib.compress(b"\x00" * 64)), "image/png", 413, "too_many_pixels"),
    ],
    ids=[
        "empty",
        "truncated",
        "text-as-png",
        "text-plain",
        "text-octet",
        "png-declared-jpeg",
        "json-type",
        "zero-by-zero",
        "one-by-n",
        "black",
        "gray",
        "decompression-bomb",
    ],
)
@pytest.mark.parametrize("endpoint", ["/enhance", "/segment"])
def test_bad_uploads_get_json_4xx(
    client: TestClient, endpoint: str, body: bytes, content_type: str, status: int, code: str | None
) -> None:
    response = client.post(endpoint, content=body, headers={"content-type": content_type})
    assert_error(response, status, code)


def test_degrade_rejects_bad_uploads_too(client: TestClient) -> None:
    assert_error(client.post("/degrade?seed=1", content=TEXT, headers={"content-type": "image/png"}), 415)
    assert_error(client.post("/degrade?seed=1", content=b"", headers={"content-type": "image/png"}), 400)


@pytest.mark.parametrize(
    "url",
    [
        "/enhance?output_size=huge",
        "/enhance?format=gif",
        "/enhance?outputsize=model",
        "/segment?threshold=1.5",
        "/segment?threshold=abc",
        "/degrade?seed=-1",
        "/degrade?seed=1&types=illumination,rain",
        "/degrade?seed=1&types=",
        "/degrade?seed=1&mode=fancy",
    ],
)
def test_unknown_query_values_are_400(client: TestClient, png_bytes: bytes, url: str) -> None:
    response = client.post(url, content=png_bytes, headers={"content-type": "image/png"})
    assert_error(response, 400)


def test_multipart_without_file_field(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/enhance", files={"image": ("a.png", png_bytes, "image/png")})
    assert_error(response, 400, "missing_file")


def test_multipart_part_type_is_checked(client: TestClient) -> None:
    response = client.post("/enhance", files={"file": ("a.png", TEXT, "image/png")})
    assert_error(response, 415, "content_mismatch")


def test_not_found_and_method_not_allowed_are_json(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/enhance"), 405, "method_not_allowed")


def test_pixel_limit_setting(make_settings: Callable[..., Settings], png_bytes: bytes) -> None:
    with TestClient(create_app(make_settings(max_pixels=10_000))) as small:
        response = small.post("/enhance", content=png_bytes, headers={"content-type": "image/png"})
        assert_error(response, 413, "too_many_pixels")


def test_upload_limit_by_content_length(make_settings: Callable[..., Settings]) -> None:
    big = encode(fundus_array(400, 300, seed=3))
    assert len(big) > 20_000
    with TestClient(create_app(make_settings(max_upload_mb=0.01))) as small:
        raw = small.post("/enhance", content=big, headers={"content-type": "image/png"})
        assert_error(raw, 413, "too_large")
        multipart = small.post("/segment", files={"file": ("a.png", big, "image/png")})
        assert_error(multipart, 413, "too_large")


def test_docs_work_offline_and_describe_security_and_pacs_failures(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    external = re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", page.text)
    assert not external, external  # no CDN: nothing is fetched from outside this service
    for asset in re.findall(r"""(?:src|href)=["'](/docs/static/[^"']+)""", page.text):
        assert client.get(asset).status_code == 200, asset
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http", "apiKey"}
    enhance = spec["paths"]["/enhance"]["post"]
    assert "502" in enhance["responses"] and enhance["security"]
    assert "security" in spec["paths"]["/model"]["get"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    example = spec["components"]["schemas"]["ModelResponse"]["examples"][0]
    assert example["parameter_count"] == 756_875  # the lite preset's size
    assert "curl" in spec["info"]["description"]


def test_health_probes_are_logged_at_debug(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fundus.app"):
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
            assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    requests = [r for r in caplog.records if r.getMessage() == "request"]
    assert len(requests) == 1 and getattr(requests[0], "endpoint", None) == "other"  # /openapi.json
