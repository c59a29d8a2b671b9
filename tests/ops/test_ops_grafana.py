"""Grafana provisioning: the data source, the dashboard provider and the dashboard fit together."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.ops.support import DEPLOY, REPO_ROOT

GRAFANA = DEPLOY / "grafana"


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "fundus.json").read_text())


def _compose_grafana() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["grafana"]


def test_data_source_points_at_the_compose_prometheus() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert "prometheus" in services
    variable = next(v for v in _dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fundus.yml").read_text())
    (provider,) = providers["providers"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in _compose_grafana()["volumes"]}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    home = _compose_grafana()["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/fundus.json"


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "fundus-enhance"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    # No two panels overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
