"""``/degrade`` on huge photographs: refused from the header beyond its own pixel limit, one job at a
time, never answered after the deadline, and the server's memory stays bounded (peak RSS of a real
``fundus serve``)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.ops.monitoring import clean_environment, fundus_process, wait_ready
from tests.ops.support import free_port


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _fundus_jpeg(side: int) -> bytes:
    """A smooth fundus-like disc at ``side``² (JPEG compresses it to about a megabyte)."""
    small = np.zeros((512, 512, 3), np.uint8)
    cv2.circle(small, (256, 256), 240, (30, 70, 190), -1)  # BGR: reddish
    cv2.circle(small, (330, 250), 40, (120, 190, 240), -1)
    image = cv2.resize(small, (side, side), interpolation=cv2.INTER_LINEAR)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return data.tobytes()


@pytest.fixture
def server(tmp_path: Path, tiny_artifact: Path):
    port = free_port()
    env = clean_environment(
        FUNDUS_WEIGHTS=str(tiny_artifact), FUNDUS_PORT=str(port), FUNDUS_HOST="127.0.0.1",
        FUNDUS_DEVICE="cpu", FUNDUS_WARMUP="false", FUNDUS_TORCH_THREADS="1", FUNDUS_REQUEST_TIMEOUT_S="2",
        FUNDUS_MAX_DEGRADE_PIXELS="9000000", OMP_NUM_THREADS="1",
    )  # fmt: skip
    with fundus_process("serve", env, tmp_path) as process:
        wait_ready(f"http://127.0.0.1:{port}", process, tmp_path / "serve.log", timeout_s=120)
        yield f"http://127.0.0.1:{port}", process


def test_a_photograph_over_the_degrade_limit_is_refused_before_decoding(server: tuple) -> None:
    base, process = server
    huge = _fundus_jpeg(7900)  # 62 MP: inside FUNDUS_MAX_PIXELS, over FUNDUS_MAX_DEGRADE_PIXELS
    assert len(huge) < 4 << 20
    before = _peak_rss_mb(process.pid)
    clock = time.monotonic()
    response = httpx.post(
        f"{base}/degrade?seed=1", content=huge, headers={"content-type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
    assert time.monotonic() - clock < 3
    assert _peak_rss_mb(process.pid) - before < 100


def test_degrade_is_never_answered_after_the_deadline(server: tuple) -> None:
    base, process = server
    body = _fundus_jpeg(2900)  # 8.4 MP: allowed, but longer than the 2 s deadline on a busy CPU
    before = _peak_rss_mb(process.pid)
    responses = []
    for _ in range(3):
        clock = time.monotonic()
        response = httpx.post(
            f"{base}/degrade?seed=2", content=body, headers={"content-type": "image/jpeg"}, timeout=60
        )
        responses.append((response.status_code, time.monotonic() - clock))
    for status, seconds in responses:
        assert status in (200, 504)
        if status == 200:
            assert seconds < 2.0 + 0.5, responses  # a 200 only within the deadline (plus transfer)
    assert _peak_rss_mb(process.pid) - before < 1200


def test_dicom_bombs_do_not_grow_the_server(server: tuple, fundus_rgb: np.ndarray) -> None:
    """The same bombs as tests/hardening/test_dicom_bombs.py, through HTTP: the server's peak RSS."""
    from tests.hardening.bombs import deflate_bomb, jpeg_frame_bomb

    base, process = server
    before = _peak_rss_mb(process.pid)
    headers = {"content-type": "application/dicom"}
    deflated = httpx.post(
        f"{base}/enhance", content=deflate_bomb(fundus_rgb, 1 << 30), headers=headers, timeout=60
    )
    assert deflated.status_code == 413
    framed = httpx.post(f"{base}/enhance", content=jpeg_frame_bomb(fundus_rgb), headers=headers, timeout=60)
    assert framed.status_code == 415
    assert _peak_rss_mb(process.pid) - before < 100
