"""Every metric the dashboard, the rules and the HPA adapter read is one the service really exposes.

The API's collectors (``service.metrics.Metrics``) and the worker's (``service.worker_metrics``) are
instantiated and their families listed, so a renamed metric breaks this test rather than a dashboard.
"""

from __future__ import annotations

import importlib.util
import json
import re
from types import ModuleType

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.worker_metrics import WorkerMetrics
from tests.ops.support import DEPLOY, REPO_ROOT

# Where a metric outside the two collector classes is expected to be defined.
EXPECTED_SOURCE = {"fundus_workers_alive": "the API with the Redis queue (live worker heartbeats, a gauge)"}
METRIC_NAME = re.compile(r"\bfundus_[a-z0-9_]*[a-z0-9]\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def exposed_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def names_defined_in_service_source() -> set[str]:
    """Metric names written as string literals anywhere in the service package (e.g. queue backends)."""
    found: set[str] = set()
    for path in (REPO_ROOT / "service").rglob("*.py"):
        found.update(re.findall(r"[\"'](fundus_[a-z0-9_]+)[\"']", path.read_text()))
    return found


def referenced_names() -> dict[str, set[str]]:
    references: dict[str, set[str]] = {}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fundus.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for name in METRIC_NAME.findall(target["expr"]):
                references.setdefault(name, set()).add(f"dashboard: {panel['title']}")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in METRIC_NAME.findall(rule["expr"]):
                references.setdefault(name, set()).add(f"rule: {rule.get('alert') or rule['record']}")
    adapter_doc = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter.yaml").read_text())
    adapter = yaml.safe_load(adapter_doc["data"]["config.yaml"])
    for rule in adapter["externalRules"]:
        for name in METRIC_NAME.findall(rule["seriesQuery"] + " " + rule["metricsQuery"]):
            references.setdefault(name, set()).add(f"prometheus-adapter: {rule['name']['as']}")
    return references


def test_referenced_metrics_are_exposed() -> None:
    known = exposed_names(Metrics().registry) | exposed_names(WorkerMetrics().registry)
    known |= names_defined_in_service_source()
    references = referenced_names()
    assert len(references) > 10
    unknown = {
        name: {"used by": sorted(where), "expected from": EXPECTED_SOURCE.get(name, "?")}
        for name, where in references.items() if name not in known
    }
    assert not unknown, f"metrics no process exposes: {json.dumps(unknown, indent=1)}"


def test_design_metrics_are_on_the_dashboard() -> None:
    """The metrics the design fixes (DESIGN §7) all appear on the dashboard."""
    dashboard = (DEPLOY / "grafana" / "dashboards" / "fundus.json").read_text()
    for name in ("fundus_requests_total", "fundus_request_duration_seconds", "fundus_queue_wait_seconds",
                 "fundus_batch_size", "fundus_inference_duration_seconds", "fundus_queue_depth",
                 "fundus_rejected_total", "fundus_model_info"):
        assert name in dashboard, name


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fundus_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_probe_reads_the_worker_metrics() -> None:
    """The container probe for workers against a real worker metrics endpoint: up, then down."""
    probe = _healthcheck_module()
    metrics = WorkerMetrics()
    assert probe.WORKER_UP_METRIC in exposed_names(metrics.registry)
    server = metrics.serve(0, host="127.0.0.1")
    try:
        port = server.server_port
        metrics.up.set(1)
        healthy, reason = probe.probe_worker("127.0.0.1", port, timeout=5)
        assert healthy, reason
        metrics.up.set(0)
        healthy, reason = probe.probe_worker("127.0.0.1", port, timeout=5)
        assert not healthy and "0" in reason
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# HELP x\nfundus_worker_redis_up 1.0\n", 1.0),
        ('fundus_worker_redis_up{worker="a"} 0.0\n', 0.0),
        ("fundus_worker_redis_upper 1.0\n", None),
        ("fundus_batch_size_count 3.0\n", None),
    ],
)
def test_worker_up_value_parsing(text: str, expected: float | None) -> None:
    assert _healthcheck_module().worker_up_value(text) == expected


def test_probe_script_needs_only_the_standard_library() -> None:
    source = (DEPLOY / "docker" / "healthcheck.py").read_text()
    imports = set(re.findall(r"^(?:from|import) ([a-z_.]+)", source, re.MULTILINE))
    allowed = {"__future__", "os", "sys", "urllib.error", "urllib.request", "collections.abc"}
    assert imports <= allowed, imports - allowed
