"""YAML config → dataclasses: unknown keys fail, overrides are typed, shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.parametrize("name", ["paper", "cpu", "smoke"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.run.name == name
    assert config.model.preset == {"paper": "paper", "cpu": "lite", "smoke": "tiny"}[name]


def test_paper_and_cpu_settings() -> None:
    paper = load_config(CONFIGS / "paper.yaml")
    assert (paper.enhance.batch_labeled, paper.enhance.batch_unlabeled) == (16, 8)
    assert paper.data.working_size == 512 and paper.enhance.loss.seg_weight == 0.5
    cpu = load_config(CONFIGS / "cpu.yaml")
    assert (cpu.data.working_size, cpu.data.crop_size) == (512, 256)


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"enhance\.loss\.edge_wieght"):
        config_from_dict({"enhance": {"loss": {"edge_wieght": 1.0}}})
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match=r"run\.nmae"):
        config_from_dict({}, ["run.nmae=x"])


def test_overrides_are_parsed_and_checked() -> None:
    config = config_from_dict(
        {"enhance": {"steps": 10}},
        [
            "enhance.steps=25",
            "data.clean_sets=[hrf]",
            "enhance.loss.consistency_weight=0",
            "rsp.optim.lr=1e-3",
        ],
    )
    assert config.enhance.steps == 25
    assert config.data.clean_sets == ["hrf"]
    assert config.enhance.loss.consistency_weight == 0.0
    assert config.rsp.optim.lr == 1e-3
    assert config.rsp.optim.lr_min == 1e-5  # the phase's own default survives a partial override
    with pytest.raises(ConfigError, match="integer"):
        config_from_dict({}, ["enhance.steps=many"])
    with pytest.raises(ConfigError, match="stages"):
        config_from_dict({}, ["enhance.loss.stages=[3]"])
