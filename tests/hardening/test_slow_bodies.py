"""Slow or stalled request bodies are timed out (408) by a real ``fundus serve``, and a shutdown is
not held up by them."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.ops.monitoring import clean_environment, fundus_process, wait_ready
from tests.ops.support import free_port


def _headers(port: int, length: int) -> bytes:
    return (
        f"POST /enhance HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _status(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest) if rest else {}


@pytest.fixture
def server(tmp_path: Path, tiny_artifact: Path):
    port = free_port()
    env = clean_environment(
        FUNDUS_WEIGHTS=str(tiny_artifact), FUNDUS_PORT=str(port), FUNDUS_HOST="127.0.0.1",
        FUNDUS_DEVICE="cpu", FUNDUS_WARMUP="false", FUNDUS_TORCH_THREADS="1", FUNDUS_BODY_IDLE_TIMEOUT_S="1",
        FUNDUS_BODY_TIMEOUT_S="6", FUNDUS_BODY_MIN_RATE_BPS="200", FUNDUS_SHUTDOWN_TIMEOUT_S="20",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    with fundus_process("serve", env, tmp_path) as process:
        wait_ready(f"http://127.0.0.1:{port}", process, tmp_path / "serve.log", timeout_s=120)
        yield port, process


def test_a_stalled_body_gets_408_after_the_idle_timeout(server: tuple) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(_headers(port, 100_000) + b"\x89PNG\r\n\x1a\n")
        clock = time.monotonic()
        status, body = _status(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert time.monotonic() - clock < 5


def test_a_dripping_body_gets_408_for_its_rate(server: tuple) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(_headers(port, 100_000))
        clock = time.monotonic()
        sock.settimeout(0.5)
        status = None
        for _ in range(40):  # one byte every 0.5 s: well under the 200 bytes/s minimum
            try:
                sock.sendall(b"x")
            except OSError:
                break
            try:
                status, body = _status(sock)
                break
            except TimeoutError:
                continue
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert time.monotonic() - clock < 12


def test_shutdown_is_not_held_by_a_stalled_body(server: tuple) -> None:
    port, process = server
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.sendall(_headers(port, 100_000) + b"x" * 10)
        time.sleep(0.3)  # let the request reach the route before the signal
        clock = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        assert time.monotonic() - clock < 8
    finally:
        sock.close()
