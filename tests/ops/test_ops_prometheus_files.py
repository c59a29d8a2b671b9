"""Prometheus files checked by the real ``promtool``: configs, alert/recording rules and their unit tests."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.ops.support import DEPLOY, REPO_ROOT, require_tool

PROMTOOL_HINT = "install the Debian package `prometheus` (it ships promtool)"
CONFIGS = ("prometheus.yml", "prometheus-k8s.yml")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_promtool_check_config(name: str) -> None:
    result = _promtool("check", "config", str(DEPLOY / "prometheus" / name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path) -> None:
    """Control: the same check fails on a rule with a PromQL syntax error."""
    broken = tmp_path / "broken.yml"
    rule = {"alert": "A", "expr": "sum(rate(x[5m])"}
    broken.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    assert _promtool("check", "rules", str(broken)).returncode != 0


def test_alert_rules_unit_tests() -> None:
    """promtool unit tests: the alerts fire (or stay quiet) on synthetic series as intended."""
    result = _promtool("test", "rules", str(REPO_ROOT / "tests" / "ops" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_present() -> None:
    """Every alert the operations runbook relies on exists and carries a severity and a summary."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    required = {
        "FundusLatencyP99High", "FundusQueueWaitHigh", "FundusOldestPendingEntryOld",
        "FundusNoLiveWorker", "FundusHigh5xxRate", "FundusDeadLetters",
    }
    assert required <= set(alerts), required - set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"].get("summary"), name


def test_scrape_jobs_cover_api_and_workers() -> None:
    for name in CONFIGS:
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert {"fundus-api", "fundus-worker"} <= set(jobs), name
        # Scaled replicas are found by DNS service discovery, never listed by hand.
        for job_name in ("fundus-api", "fundus-worker"):
            assert "dns_sd_configs" in jobs[job_name], (name, job_name)
        assert config["rule_files"] == ["alerts.yml"], name
