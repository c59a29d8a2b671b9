"""Fuzzing the HTTP API: query parameters drawn from its own OpenAPI schema plus corrupted real
images and DICOM files (truncated, bit-flipped, headers swapped). Bounded in count and time: every
answer is a JSON error or an image, never a 500, and the process keeps its memory."""

from __future__ import annotations

import io
import resource
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dicom.builders import Variant, make_dicom
from tests.service.conftest import encode, fundus_array

ENDPOINTS = ("/enhance", "/segment", "/degrade")
MEDIA = (
    "image/png",
    "image/jpeg",
    "image/tiff",
    "application/dicom",
    "application/octet-stream",
    "text/plain",
)


def _seeds(fundus_rgb: np.ndarray) -> list[bytes]:
    array = fundus_array(96, 80)
    dicom = make_dicom(fundus_rgb, Variant("op", "RGB", "jpeg"))
    raw_dicom = make_dicom(fundus_rgb, Variant("sc", "MONOCHROME2", "raw"))
    return [encode(array), encode(array, "JPEG"), encode(array, "TIFF"), dicom, raw_dicom]


def _query_values(spec: dict[str, Any], path: str) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per query parameter of ``path``: valid values from its schema, or junk."""
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for parameter in spec["paths"][path]["post"].get("parameters", []):
        if parameter["in"] != "query":
            continue
        schema = parameter.get("schema", {})
        options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
        valid: list[st.SearchStrategy[Any]] = []
        for option in options:
            if "enum" in option:
                valid.append(st.sampled_from(option["enum"]))
            elif option.get("type") == "integer":
                valid.append(st.integers(-(2**64), 2**64))
            elif option.get("type") == "number":
                valid.append(st.floats(allow_nan=True, allow_infinity=True))
            elif option.get("type") == "boolean":
                valid.append(st.booleans())
            else:
                valid.append(st.text(max_size=20))
        junk = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
        strategies[parameter["name"]] = st.one_of(*valid, junk)
    return strategies


def _corrupt(data: bytes, how: str, where: float, value: int) -> bytes:
    if not data:
        return data
    position = int(where * (len(data) - 1))
    if how == "truncate":
        return data[:position]
    if how == "flip":
        changed = bytearray(data)
        for offset in range(0, min(64, len(changed) - position), 7):
            changed[position + offset] ^= value
        return bytes(changed)
    if how == "splice":
        return data[:position] + bytes([value]) * 4096 + data[position:]
    return data


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def test_fuzz_no_500_no_hang_bounded_memory(
    client: TestClient, spec: dict[str, Any], fundus_rgb: np.ndarray
) -> None:
    seeds = _seeds(fundus_rgb)
    per_path = {path: st.fixed_dictionaries({}, optional=_query_values(spec, path)) for path in ENDPOINTS}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seen: dict[int, int] = {}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        path=st.sampled_from(ENDPOINTS),
        data=st.data(),
        seed_index=st.integers(0, len(seeds) - 1),
        how=st.sampled_from(("none", "truncate", "flip", "splice")),
        where=st.floats(0.0, 1.0),
        value=st.integers(1, 255),
        media=st.sampled_from(MEDIA),
        multipart=st.booleans(),
    )
    def one(path: str, data: st.DataObject, seed_index: int, how: str, where: float, value: int,
            media: str, multipart: bool) -> None:  # fmt: skip
        query = data.draw(per_path[path])
        body = _corrupt(seeds[seed_index], how, where, value)
        params = {k: str(v) for k, v in query.items()}
        if multipart:
            response = client.post(path, params=params, files={"file": ("x", body, media)})
        else:
            response = client.post(path, params=params, content=body, headers={"content-type": media})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500 or response.status_code in (503, 504), (
            path,
            query,
            how,
            response.text,
        )
        if response.status_code >= 400:
            assert response.json()["error"]["code"]

    one()
    assert sum(seen.values()) >= 100
    assert any(status == 200 for status in seen) and any(400 <= status < 500 for status in seen), seen
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    assert grown < 500, f"peak RSS grew by {grown:.0f} MB"


def test_corrupt_dicom_elements_never_crash(client: TestClient, fundus_rgb: np.ndarray) -> None:
    """Each attribute of a real DICOM file in turn replaced by junk of its own VR's shape."""
    original = pydicom.dcmread(io.BytesIO(make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))))
    keywords = [element.keyword for element in original if element.keyword and element.keyword != "PixelData"]
    for keyword in keywords:
        for junk in ("", "9" * 40, "\x00\xff"):
            dataset = pydicom.dcmread(io.BytesIO(make_dicom(fundus_rgb, Variant("op", "RGB", "raw"))))
            try:
                setattr(dataset, keyword, junk)
                buffer = io.BytesIO()
                dataset.save_as(buffer, enforce_file_format=False)
            except Exception:  # pydicom refuses to write that value: nothing to send
                continue
            response = client.post(
                "/enhance", content=buffer.getvalue(), headers={"content-type": "application/dicom"}
            )
            assert response.status_code < 500, (keyword, junk, response.text)
