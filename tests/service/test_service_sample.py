"""``fundus sample`` writes a photograph the service accepts (the README's first example uses it)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.cli import main


def test_sample_is_written_and_accepted(tmp_path: Path, client: TestClient) -> None:
    out = tmp_path / "sample.jpg"
    assert main(["sample", str(out)]) == 0
    data = out.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 200_000
    response = client.post("/enhance", content=data, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200 and response.headers["x-fov"] == "fitted"
    assert main(["sample", str(tmp_path)]) == 0 and (tmp_path / "hrf-06_h.jpg").is_file()
