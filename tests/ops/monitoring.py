"""Shared pieces of the monitoring integration tests: processes, Prometheus queries, dashboard parsing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.ops.support import DEPLOY, free_port, require_tool, wait_for

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fundus.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Grafana's built-in variables, replaced by what Grafana would send for a 1-hour view.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "${__range}": "1h"}


def fundus_like_png(size: int = 160) -> bytes:
    """A synthetic fundus photograph: a reddish disc on black with a dark vessel-like line."""
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - size / 2, xx - size / 2)
    inside = distance < size * 0.45
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = np.where(inside, 180 - 0.5 * distance, 0)
    image[..., 1] = np.where(inside, 80 - 0.2 * distance, 0)
    image[..., 2] = np.where(inside, 30, 0)
    image[(np.abs(yy - xx) < 2) & inside] = (90, 30, 20)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def clean_environment(**settings: str) -> dict[str, str]:
    """The current environment without any FUNDUS_* variable, plus ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FUNDUS_")}
    env.update(settings)
    return env


@contextmanager
def fundus_process(command: str, env: Mapping[str, str], workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``fundus <command>`` (via ``python -m service.cli``) with its output in ``workdir/<command>.log``."""
    log_path = workdir / f"{command}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", command], env=dict(env), cwd=workdir,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def check_alive(process: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    if process.poll() is not None:
        pytest.fail(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")


def wait_ready(base: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180) -> None:
    def ready() -> bool:
        check_alive(process, "fundus serve", log_path)
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

    wait_for(ready, timeout_s, "fundus serve to become ready", interval_s=0.5)


def send_traffic(base: str) -> dict[str, int]:
    """A few requests so that every API series exists: a model pass, a client error, metadata."""
    with httpx.Client(base_url=base, timeout=120) as client:
        return {
            "enhance": client.post("/enhance", content=fundus_like_png(),
                                   headers={"Content-Type": "image/png"}).status_code,
            "bad_media": client.post("/enhance", content=b"not an image",
                                     headers={"Content-Type": "text/plain"}).status_code,
            "model": client.get("/model").status_code,
            "healthz": client.get("/healthz").status_code,
        }


@contextmanager
def prometheus_server(targets: Mapping[str, str], workdir: Path) -> Iterator[str]:
    """The Debian ``prometheus`` on loopback with our rules, scraping ``{job: host:port}`` every second.

    Yields its base URL once every job has been scraped successfully at least three times.
    """
    binary = require_tool("prometheus", "install the Debian package `prometheus`")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        def scraped_three_times() -> bool:
            check_alive(process, "prometheus", log_path)
            expr = "count_over_time(up[1m]) >= 3 and up == 1"
            return {series["metric"]["job"] for series in query(base, expr)} == set(targets)

        wait_for(scraped_three_times, 60, f"three successful scrapes of {sorted(targets)}")
        yield base
    finally:
        stop(process)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; fails with Prometheus's own error message when the expression is bad."""
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body.get("status") == "success", (
        f"query failed: {expr}\n{body.get('errorType')}: {body.get('error')}"
    )
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(#id panel title / refId, expression with Grafana variables substituted) for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"#{panel['id']} {panel['title']} / {target['refId']}", expr))
    return queries


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [
        (rule.get("alert") or rule["record"], rule["expr"]) for group in groups for rule in group["rules"]
    ]


def evaluate_all(base: str, queries: list[tuple[str, str]]) -> tuple[list[str], dict[str, list[Any]]]:
    """Run every query; returns (failures with Prometheus's error, {name: result} of the ones that ran)."""
    failures: list[str] = []
    results: dict[str, list[Any]] = {}
    for name, expr in queries:
        assert "$" not in expr, f"unsubstituted variable in {name}: {expr}"
        try:
            results[name] = query(base, expr)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    return failures, results
