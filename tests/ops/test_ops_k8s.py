"""Kubernetes manifests validated against the Kubernetes OpenAPI schemas by ``kubernetes-validate``.

Strict mode (unknown fields are errors) at two fixed versions: the oldest cluster we support and the
newest schema set the validator ships. Plus the promises the manifests make: probes, graceful stop,
GPU requests, scaling and disruption budgets, and no real secret values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.ops.support import DEPLOY

K8S = DEPLOY / "k8s"
VERSIONS = ("1.33.0", "1.37.0")
NOT_MANIFESTS = {"kustomization.yaml"}


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name not in NOT_MANIFESTS)


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def by_kind_and_name() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), documents(), ids=[name for name, _ in documents()])
def test_manifest_is_valid(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_validator_rejects_mistakes() -> None:
    """Control: a misspelt field and a wrong type fail in the same validator and mode."""
    deployment = copy.deepcopy(by_kind_and_name()[("Deployment", "fundus-api")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    deployment = copy.deepcopy(by_kind_and_name()[("Deployment", "fundus-api")])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_expected_objects_exist() -> None:
    objects = set(by_kind_and_name())
    expected = {
        ("Deployment", "fundus-api"),
        ("Service", "fundus-api"),
        ("Deployment", "fundus-worker"),
        ("ConfigMap", "fundus-config"),
        ("Secret", "fundus-secrets"),
        ("HorizontalPodAutoscaler", "fundus-worker"),
        ("PodDisruptionBudget", "fundus-api"),
        ("PodDisruptionBudget", "fundus-worker"),
        ("Deployment", "redis"),
        ("Service", "redis"),
    }
    assert expected <= objects, expected - objects


@pytest.mark.parametrize("name", ["fundus-api", "fundus-worker"])
def test_deployments_probe_and_stop_gracefully(name: str) -> None:
    pod = by_kind_and_name()[("Deployment", name)]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, (name, probe)
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert "preStop" in container["lifecycle"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env_from = {
        source.get("configMapRef", source.get("secretRef", {})).get("name") for source in container["envFrom"]
    }
    assert env_from == {"fundus-config", "fundus-secrets"}


def test_api_probes_use_the_service_endpoints() -> None:
    container = by_kind_and_name()[("Deployment", "fundus-api")]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_workers_request_a_gpu_and_scale_on_queue_wait() -> None:
    objects = by_kind_and_name()
    container = objects[("Deployment", "fundus-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    hpa = objects[("HorizontalPodAutoscaler", "fundus-worker")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "fundus-worker"
    names = {
        metric["external"]["metric"]["name"] for metric in hpa["metrics"] if metric["type"] == "External"
    }
    assert "fundus_queue_wait_seconds_mean" in names
    # The adapter rules publish exactly the metrics the HPA asks for.
    adapter = yaml.safe_load(objects[("ConfigMap", "prometheus-adapter-fundus")]["data"]["config.yaml"])
    published = {rule["name"]["as"] for rule in adapter["externalRules"]}
    assert names <= published, names - published


def test_secret_example_holds_no_values() -> None:
    secret = by_kind_and_name()[("Secret", "fundus-secrets")]
    assert set(secret["stringData"]) == {
        "REDIS_PASSWORD",
        "FUNDUS_REDIS_PASSWORD",
        "FUNDUS_REDIS_URL",
        "FUNDUS_API_KEYS",
    }
    assert all(value == "" for value in secret["stringData"].values())
    assert "data" not in secret


def test_redis_config_matches_the_compose_one() -> None:
    """The in-cluster Redis runs the very same transient-queue configuration as docker compose."""
    configmap = by_kind_and_name()[("ConfigMap", "redis-config")]
    assert configmap["data"]["redis.conf"] == (DEPLOY / "redis" / "redis.conf").read_text()


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # The Secret is created by hand (never committed with values) and the adapter rules live elsewhere.
    assert "secret.example.yaml" not in kustomization["resources"]
