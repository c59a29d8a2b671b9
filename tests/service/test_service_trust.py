"""Trust signals over HTTP: ``POST /quality``, the quality / uncertainty / structure headers of
``/enhance``, ``only_if_needed``, ``output=uncertainty``, their settings and metrics."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model.quality import QualityNet, save_quality
from service.app import create_app
from service.settings import Settings
from tests.dicom.builders import Variant, make_dicom
from tests.service.conftest import decode, encode, fundus_array
from tests.service.test_service_http import assert_error

PNG = {"content-type": "image/png"}
GRADE = re.compile(r"^(good|poor);p=(0\.\d{3}|1\.000)$")
FIDELITY = re.compile(r"^dice=(\d\.\d{3});removed=(\d+\.\d{3});added=(\d+\.\d{3})$")


def _fixed_grader(directory: Path, good: bool) -> Path:
    """A grader that answers P(good) ≈ 1 (or ≈ 0) for every photograph."""
    net = QualityNet(width=4)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(12.0 if good else -12.0)
    path = directory / ("good.safetensors" if good else "poor.safetensors")
    save_quality(path, net, 1.0, {"note": "fixed answer for tests"})
    return path


@pytest.fixture(scope="module")
def graders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("graders")
    return {"good": _fixed_grader(directory, True), "poor": _fixed_grader(directory, False)}


@pytest.fixture(scope="module")
def always_good(make_settings: Callable[..., Settings], graders: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(quality_weights=str(graders["good"])))) as client:
        yield client


def _samples(client: TestClient, name: str) -> dict[str, float]:
    """``{sample name + labels: value}`` of one metric family."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == name:
            return {s.name + repr(sorted(s.labels.items())): s.value for s in family.samples}
    return {}


def _count(client: TestClient, histogram: str) -> float:
    return _samples(client, histogram).get(f"{histogram}_count[]", 0.0)


# --- POST /quality -------------------------------------------------------------------------------


def test_quality_answers_grade_probabilities_and_version(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/quality", content=png_bytes, headers=PNG)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"grade", "probabilities", "model_version"}
    assert body["grade"] in ("good", "poor")
    assert set(body["probabilities"]) == {"good", "poor"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert (body["grade"] == "good") == (body["probabilities"]["good"] >= 0.5)
    assert body["model_version"].startswith("quality-")


def test_quality_follows_the_grader(always_good: TestClient, png_bytes: bytes) -> None:
    body = always_good.post("/quality", content=png_bytes, headers=PNG).json()
    assert body["grade"] == "good"
    assert body["probabilities"]["good"] > 0.99


def test_quality_accepts_multipart_and_dicom(client: TestClient, png_bytes: bytes) -> None:
    multipart = client.post("/quality", files={"file": ("a.png", png_bytes, "image/png")})
    assert multipart.status_code == 200, multipart.text
    dicom = make_dicom(fundus_array(128, 96), Variant("op", "RGB", "explicit"))
    response = client.post("/quality", content=dicom, headers={"content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    assert response.json()["grade"] in ("good", "poor")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, None),
        (b"this is not an image", "image/png", 415, None),
        (encode(np.zeros((120, 160, 3), dtype=np.uint8)), "image/png", 422, "no_fundus"),
        (encode(np.full((1, 300, 3), 120, dtype=np.uint8)), "image/png", 422, "image_too_small"),
        (b"DICM" * 40, "application/dicom", 415, None),
    ],
)
def test_quality_refuses_bad_uploads_with_json(
    client: TestClient, body: bytes, content_type: str, status: int, code: str | None
) -> None:
    assert_error(client.post("/quality", content=body, headers={"content-type": content_type}), status, code)


def test_quality_rejects_unknown_query(client: TestClient, png_bytes: bytes) -> None:
    assert_error(client.post("/quality?grade=1", content=png_bytes, headers=PNG), 400)


def test_quality_disabled_is_a_clear_404(make_settings: Callable[..., Settings], png_bytes: bytes) -> None:
    with TestClient(create_app(make_settings(quality_weights=""))) as client:
        assert_error(client.post("/quality", content=png_bytes, headers=PNG), 404, "not_enabled")
        enhanced = client.post("/enhance", content=png_bytes, headers=PNG)
        assert enhanced.status_code == 200
        assert "x-quality-before" not in enhanced.headers
        assert "x-enhance-uncertainty" in enhanced.headers
        assert_error(client.post("/enhance?only_if_needed=true", content=png_bytes, headers=PNG), 400)


def test_bad_quality_weights_fail_start_up(
    make_settings: Callable[..., Settings], tiny_artifact: Path
) -> None:
    from service.app import StartupError

    app = create_app(make_settings(quality_weights=str(tiny_artifact)))
    with pytest.raises(StartupError, match="quality grader"), TestClient(app):
        pass


# --- /enhance headers -----------------------------------------------------------------------------


def test_enhance_carries_every_trust_header(client: TestClient, png_bytes: bytes) -> None:
    before = _count(client, "fundus_quality_before"), _count(client, "fundus_structure_dice")
    response = client.post("/enhance", content=png_bytes, headers=PNG)
    assert response.status_code == 200, response.text
    headers = response.headers
    assert headers["x-enhanced"] == "true"
    assert GRADE.match(headers["x-quality-before"])
    assert GRADE.match(headers["x-quality-after"])
    assert 0.0 <= float(headers["x-enhance-uncertainty"]) <= 1.0
    match = FIDELITY.match(headers["x-structure-fidelity"])
    assert match is not None
    assert 0.0 <= float(match.group(1)) <= 1.0
    after = _count(client, "fundus_quality_before"), _count(client, "fundus_structure_dice")
    assert after == (before[0] + 1, before[1] + 1)
    assert _count(client, "fundus_quality_after") >= 1
    assert _count(client, "fundus_enhance_uncertainty") >= 1


def test_structure_warning_below_the_threshold(
    make_settings: Callable[..., Settings], png_bytes: bytes
) -> None:
    with TestClient(create_app(make_settings(structure_min_dice=1.0))) as strict:
        response = strict.post("/enhance", content=png_bytes, headers=PNG)
        dice = float(FIDELITY.match(response.headers["x-structure-fidelity"]).group(1))  # type: ignore[union-attr]
        assert dice < 1.0  # the random tiny model changes the vessel map
        assert response.headers["x-structure-warning"].startswith("vessel map changed: dice")
        assert _samples(strict, "fundus_structure_warnings")["fundus_structure_warnings_total[]"] == 1.0
    with TestClient(create_app(make_settings(structure_min_dice=0.0))) as lenient:
        response = lenient.post("/enhance", content=png_bytes, headers=PNG)
        assert "x-structure-warning" not in response.headers
        assert _samples(lenient, "fundus_structure_warnings")["fundus_structure_warnings_total[]"] == 0.0


def test_trust_signals_off_drops_model_side_headers(
    make_settings: Callable[..., Settings], png_bytes: bytes
) -> None:
    with TestClient(create_app(make_settings(trust_signals=False))) as client:
        response = client.post("/enhance", content=png_bytes, headers=PNG)
        assert response.status_code == 200
        assert "x-enhance-uncertainty" not in response.headers
        assert "x-structure-fidelity" not in response.headers
        assert GRADE.match(response.headers["x-quality-after"])
        assert_error(client.post("/enhance?output=uncertainty", content=png_bytes, headers=PNG), 400)


def test_segment_has_no_enhancement_headers(client: TestClient, png_bytes: bytes) -> None:
    response = client.post("/segment", content=png_bytes, headers=PNG)
    assert response.status_code == 200
    assert not {"x-enhanced", "x-quality-before", "x-enhance-uncertainty"} & set(response.headers)


# --- only_if_needed -------------------------------------------------------------------------------


def test_only_if_needed_returns_a_good_photo_unchanged(always_good: TestClient) -> None:
    upload = encode(fundus_array(200, 150, seed=3))
    skipped = _samples(always_good, "fundus_enhance_skipped")["fundus_enhance_skipped_total[]"]
    response = always_good.post("/enhance?only_if_needed=true", content=upload, headers=PNG)
    assert response.status_code == 200, response.text
    assert response.content == upload
    assert response.headers["x-enhanced"] == "false"
    assert GRADE.match(response.headers["x-quality-before"]).group(1) == "good"  # type: ignore[union-attr]
    assert "x-quality-after" not in response.headers
    after = _samples(always_good, "fundus_enhance_skipped")["fundus_enhance_skipped_total[]"]
    assert after == skipped + 1


def test_only_if_needed_in_another_format_keeps_the_pixels(always_good: TestClient) -> None:
    pixels = fundus_array(200, 150, seed=4)
    response = always_good.post(
        "/enhance?only_if_needed=true&format=tiff", content=encode(pixels), headers=PNG
    )
    assert response.headers["content-type"] == "image/tiff"
    assert response.headers["x-enhanced"] == "false"
    np.testing.assert_array_equal(np.asarray(decode(response.content).convert("RGB")), pixels)


def test_only_if_needed_enhances_a_poor_photo(
    make_settings: Callable[..., Settings], graders: dict[str, Path], png_bytes: bytes
) -> None:
    with TestClient(create_app(make_settings(quality_weights=str(graders["poor"])))) as client:
        response = client.post("/enhance?only_if_needed=true", content=png_bytes, headers=PNG)
        assert response.status_code == 200
        assert response.headers["x-enhanced"] == "true"
        assert response.headers["x-quality-before"].startswith("poor;")
        assert response.content != png_bytes


def test_only_if_needed_off_always_enhances(always_good: TestClient, png_bytes: bytes) -> None:
    response = always_good.post("/enhance", content=png_bytes, headers=PNG)
    assert response.headers["x-enhanced"] == "true"
    assert response.content != png_bytes


def test_only_if_needed_returns_a_good_dicom_unchanged(always_good: TestClient) -> None:
    upload = make_dicom(fundus_array(128, 96), Variant("op", "RGB", "explicit"))
    response = always_good.post(
        "/enhance?only_if_needed=true", content=upload, headers={"content-type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-enhanced"] == "false"
    assert response.content == upload


def test_deployment_default_skips_good_photos_and_a_request_can_overrule_it(
    make_settings: Callable[..., Settings], graders: dict[str, Path], png_bytes: bytes
) -> None:
    settings = make_settings(quality_weights=str(graders["good"]), enhance_only_if_needed=True)
    with TestClient(create_app(settings)) as client:
        skipped = client.post("/enhance", content=png_bytes, headers=PNG)
        assert skipped.status_code == 200, skipped.text
        assert skipped.headers["x-enhanced"] == "false" and skipped.content == png_bytes
        forced = client.post("/enhance?only_if_needed=false", content=png_bytes, headers=PNG)
        assert forced.headers["x-enhanced"] == "true" and forced.content != png_bytes


def test_deployment_default_needs_the_grader(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="FUNDUS_ENHANCE_ONLY_IF_NEEDED=true needs the quality grader"):
        make_settings(quality_weights="", enhance_only_if_needed=True)


def test_only_if_needed_must_be_a_boolean(client: TestClient, png_bytes: bytes) -> None:
    assert_error(client.post("/enhance?only_if_needed=maybe", content=png_bytes, headers=PNG), 400)


# --- output=uncertainty ---------------------------------------------------------------------------


def test_uncertainty_map_is_gray_png_in_the_input_geometry(client: TestClient) -> None:
    pixels = fundus_array(200, 150, seed=5)
    response = client.post("/enhance?output=uncertainty", content=encode(pixels), headers=PNG)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = decode(response.content)
    assert image.mode == "L"
    assert image.size == (200, 150)
    values = np.asarray(image)
    assert values[0, 0] == 0 and values[-1, -1] == 0  # nothing outside the field of view
    assert values[75, 100] > 0 or float(response.headers["x-enhance-uncertainty"]) < 1 / 1020
    model = client.post("/enhance?output=uncertainty&output_size=model", content=encode(pixels), headers=PNG)
    assert decode(model.content).size[0] == decode(model.content).size[1]


def test_uncertainty_map_for_dicom_input_is_png(client: TestClient) -> None:
    upload = make_dicom(fundus_array(128, 96), Variant("op", "RGB", "explicit"))
    response = client.post(
        "/enhance?output=uncertainty", content=upload, headers={"content-type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).size == (128, 96)


@pytest.mark.parametrize(
    "query", ["output=uncertainty&format=jpeg", "output=uncertainty&format=dicom", "output=vessels"]
)
def test_bad_uncertainty_requests_are_400(client: TestClient, png_bytes: bytes, query: str) -> None:
    assert_error(client.post(f"/enhance?{query}", content=png_bytes, headers=PNG), 400)


# --- DICOM answers --------------------------------------------------------------------------------


def test_dicom_answer_describes_the_trust_figures(client: TestClient) -> None:
    upload = make_dicom(fundus_array(128, 96), Variant("op", "RGB", "explicit"))
    response = client.post("/enhance", content=upload, headers={"content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    import io

    derived = pydicom.dcmread(io.BytesIO(response.content))
    description = str(derived.DerivationDescription)
    assert re.search(r"quality (good|poor) p=\d\.\d{3} -> (good|poor) p=\d\.\d{3}", description)
    assert re.search(r"uncertainty \d\.\d{4}", description)
    assert re.search(r"vessel dice \d\.\d{3}", description)
    assert response.headers["x-structure-fidelity"].split(";")[0].split("=")[1] in description
