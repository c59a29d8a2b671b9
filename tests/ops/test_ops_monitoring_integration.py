"""A real Prometheus scraping a real ``fundus serve``: every dashboard query and rule evaluates cleanly.

Starts ``fundus serve`` (embedded queue, ``tiny`` weights) on a free loopback port, sends a few
requests (one of them an error) so the series exist, starts the Debian ``prometheus`` binary with the
project's alert rules and a 1 s scrape of that port, waits until it has scraped a few times, then
runs every Grafana panel query and every rule expression through ``/api/v1/query``. Queries over the
API's own metrics must also return data, which pins the metric and label names the dashboard uses to
the ones the service exposes. The container health probe is exercised against the same server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ops.monitoring import (
    clean_environment,
    dashboard_queries,
    evaluate_all,
    fundus_process,
    prometheus_server,
    query,
    rule_expressions,
    send_traffic,
    wait_ready,
)
from tests.ops.support import DEPLOY, REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.integration

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
# Series only a Redis deployment (workers, heartbeats) produces: empty with the embedded queue.
REDIS_ONLY = re.compile(r"fundus_worker_|fundus_workers_alive|job=\"fundus-worker\"")


@pytest.fixture(scope="module")
def fundus_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``fundus serve`` as a subprocess; yields (base URL, port) once ``/readyz`` answers 200."""
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = clean_environment(FUNDUS_WEIGHTS=str(tiny_artifact), FUNDUS_HOST="127.0.0.1", FUNDUS_PORT=str(port),
                            FUNDUS_DEVICE="cpu", FUNDUS_LOG_LEVEL="WARNING")
    base = f"http://127.0.0.1:{port}"
    with fundus_process("serve", env, workdir) as process:
        wait_ready(base, process, workdir / "serve.log")
        yield base, port


@pytest.fixture(scope="module")
def traffic(fundus_server: tuple[str, int]) -> dict[str, int]:
    return send_traffic(fundus_server[0])


@pytest.fixture(scope="module")
def prometheus(fundus_server: tuple[str, int], traffic: dict[str, int],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prometheus_server({"fundus-api": f"127.0.0.1:{fundus_server[1]}"},
                           tmp_path_factory.mktemp("prometheus")) as base:
        yield base


def test_traffic_reached_the_service(traffic: dict[str, int]) -> None:
    assert traffic == {"enhance": 200, "bad_media": 415, "model": 200, "healthz": 200}


def test_dashboard_has_the_required_panels() -> None:
    titles = " | ".join(title for title, _ in dashboard_queries()).lower()
    for words in ("requests per second by status", "p50 / p95 / p99", "queue wait vs inference per worker",
                  "average batch size", "queue depth", "rejections", "workers alive",
                  "quality before vs after", "uncertainty", "structure fidelity", "structure warnings"):
        assert words in titles, words


def test_every_panel_query_evaluates(prometheus: str) -> None:
    queries = dashboard_queries()
    failures, results = evaluate_all(prometheus, queries)
    assert not failures, "\n".join(failures)
    empty = [f"{name}: {expr}" for name, expr in queries if not REDIS_ONLY.search(expr) and not results[name]]
    assert not empty, "API queries returned no data (wrong metric or label names?):\n" + "\n".join(empty)


def test_every_rule_expression_evaluates(prometheus: str) -> None:
    failures, _ = evaluate_all(prometheus, rule_expressions())
    assert not failures, "\n".join(failures)


def test_prometheus_evaluates_the_loaded_rules_without_error(prometheus: str) -> None:
    expected = {name for name, _ in rule_expressions()}

    def all_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = wait_for(all_evaluated, 30, "every rule to be evaluated once")
    assert {rule["name"] for rule in rules} == expected
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not unhealthy, unhealthy


def test_model_info_and_request_labels(prometheus: str) -> None:
    """The labels the dashboard groups by carry what the design promises (and no request ids)."""
    info = query(prometheus, "fundus_model_info")
    assert info and {"version", "preset", "device"} <= set(info[0]["metric"])
    statuses = {series["metric"]["status"] for series in query(prometheus, "fundus_requests_total")}
    assert {"200", "415"} <= statuses
    for series in query(prometheus, '{__name__=~"fundus_.+"}'):
        assert not any("request_id" in label for label in series["metric"]), series["metric"]


def _healthcheck(role: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), role], env=clean_environment(**settings),
                          capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT)


def test_container_healthcheck_against_the_server(fundus_server: tuple[str, int]) -> None:
    healthy = _healthcheck("api", FUNDUS_PORT=str(fundus_server[1]))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    nobody = _healthcheck("api", FUNDUS_PORT=str(free_port()), FUNDUS_HEALTHCHECK_TIMEOUT_S="2")
    assert nobody.returncode == 1 and nobody.stdout.startswith("unhealthy")
