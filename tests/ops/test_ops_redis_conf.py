"""deploy/redis/redis.conf loaded by a real ``redis-server``: a transient, bounded, non-evicting queue."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.ops.support import DEPLOY, free_port, require_tool, wait_for

PASSWORD = "ops-test-password"


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = require_tool("redis-server", "install the Debian package `redis-server`")
    workdir: Path = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(
        [server, str(DEPLOY / "redis" / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", PASSWORD, "--dir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=5)
    try:
        def answers() -> bool:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"redis-server refused deploy/redis/redis.conf:\n{output}")
            return bool(client.ping())

        wait_for(answers, 20, "redis-server with deploy/redis/redis.conf")
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_no_persistence(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("save") == {"save": ""}
    assert redis_client.config_get("appendonly") == {"appendonly": "no"}


def test_bounded_memory_without_eviction(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert int(redis_client.config_get("maxmemory")["maxmemory"]) == 1024**3


def test_full_queue_refuses_writes_instead_of_evicting(redis_client: redis.Redis) -> None:
    """With the memory limit reached, new entries are refused with an error; stored ones stay."""
    redis_client.xadd("ops:test", {"payload": b"x" * 1024})
    original = redis_client.config_get("maxmemory")["maxmemory"]
    try:
        redis_client.config_set("maxmemory", 1024 * 1024)
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            for _ in range(64):
                redis_client.xadd("ops:test", {"payload": b"x" * 256 * 1024})
    finally:
        redis_client.config_set("maxmemory", original)
    assert redis_client.xlen("ops:test") >= 1
    redis_client.delete("ops:test")


def test_password_is_required(redis_client: redis.Redis) -> None:
    kwargs = redis_client.connection_pool.connection_kwargs
    anonymous = redis.Redis(host=kwargs["host"], port=kwargs["port"], socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()
