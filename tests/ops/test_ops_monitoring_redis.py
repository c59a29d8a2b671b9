"""The dashboard and rules against a Redis deployment: redis-server (with deploy/redis/redis.conf),
one ``fundus worker`` and one ``fundus serve`` with ``FUNDUS_REDIS_URL``, both scraped by a real
Prometheus under the compose job names. Every panel query must now return data: the worker panels
are pinned to the metric and label names the worker really exposes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.ops.monitoring import (
    clean_environment,
    dashboard_queries,
    evaluate_all,
    fundus_process,
    prometheus_server,
    rule_expressions,
    send_traffic,
    stop,
    wait_ready,
)
from tests.ops.support import DEPLOY, free_port, require_tool, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "ops-redis-test"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = require_tool("redis-server", "install the Debian package `redis-server`")
    workdir = tmp_path_factory.mktemp("redis-stack")
    port = free_port()
    process = subprocess.Popen(
        [server, str(DEPLOY / "redis" / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", PASSWORD, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=5)
    try:
        wait_for(lambda: process.poll() is None and client.ping(), 20, "redis-server")
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    finally:
        client.close()
        stop(process)


@pytest.fixture(scope="module")
def stack(tiny_artifact: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Worker + API on Redis, traffic sent, Prometheus scraping both; yields the Prometheus URL."""
    workdir = tmp_path_factory.mktemp("redis-stack-processes")
    api_port, worker_metrics_port = free_port(), free_port()
    common = {"FUNDUS_WEIGHTS": str(tiny_artifact), "FUNDUS_REDIS_URL": redis_url, "FUNDUS_DEVICE": "cpu",
              "FUNDUS_LOG_LEVEL": "WARNING"}
    worker_env = clean_environment(**common, FUNDUS_WORKER_METRICS_HOST="127.0.0.1",
                                   FUNDUS_WORKER_METRICS_PORT=str(worker_metrics_port))
    api_env = clean_environment(**common, FUNDUS_HOST="127.0.0.1", FUNDUS_PORT=str(api_port))
    base = f"http://127.0.0.1:{api_port}"
    with fundus_process("worker", worker_env, workdir), fundus_process("serve", api_env, workdir) as api:
        wait_ready(base, api, workdir / "serve.log")
        assert send_traffic(base)["enhance"] == 200
        targets = {"fundus-api": f"127.0.0.1:{api_port}", "fundus-worker": f"127.0.0.1:{worker_metrics_port}"}
        with prometheus_server(targets, tmp_path_factory.mktemp("prometheus-redis")) as prometheus:
            yield prometheus


def test_every_panel_query_returns_data(stack: str) -> None:
    queries = dashboard_queries()
    failures, results = evaluate_all(stack, queries)
    assert not failures, "\n".join(failures)
    empty = [f"{name}: {expr}" for name, expr in queries if not results[name]]
    assert not empty, "queries returned no data in a Redis deployment:\n" + "\n".join(empty)


def test_every_rule_expression_evaluates(stack: str) -> None:
    failures, _ = evaluate_all(stack, rule_expressions())
    assert not failures, "\n".join(failures)


def test_no_worker_alert_stays_quiet_with_a_live_worker(stack: str) -> None:
    expr = dict(rule_expressions())["FundusNoLiveWorker"]
    _, results = evaluate_all(stack, [("FundusNoLiveWorker", expr)])
    assert results["FundusNoLiveWorker"] == []
