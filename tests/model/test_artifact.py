"""Weight artifacts (``model.artifact``) and the ``fundus info`` command on top of them."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.artifact import ArtifactError, load_artifact, read_metadata, save_artifact, tensors_sha256
from model.magenet import MageNet
from model.presets import get_preset


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, MageNet]:
    torch.manual_seed(7)
    network = MageNet(get_preset("tiny"))
    path = tmp_path / "tiny.safetensors"
    save_artifact(path, network, preset="tiny", training={"steps": 3}, metrics={"psnr": 20.5})
    return path, network


def data_offset(path: Path) -> int:
    """Start of the tensor bytes in a safetensors file (8-byte header length, then the JSON header)."""
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_length


def test_round_trip_gives_identical_outputs(saved: tuple[Path, MageNet]) -> None:
    path, network = saved
    artifact = load_artifact(path)
    assert artifact.config == network.config
    assert artifact.preset == "tiny"
    assert artifact.training == {"steps": 3}
    assert artifact.metrics == {"psnr": 20.5}
    assert artifact.version.startswith("tiny-") and len(artifact.sha256) == 64
    assert not artifact.model.training
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
        actual = artifact.model(x)
    for want, got in zip(
        [*expected.images, *expected.vessel_logits], [*actual.images, *actual.vessel_logits], strict=True
    ):
        assert torch.equal(want, got)


def test_hash_covers_names_and_values(saved: tuple[Path, MageNet]) -> None:
    _, network = saved
    tensors = dict(network.state_dict())
    reference = tensors_sha256(tensors)
    name = next(iter(tensors))
    changed = dict(tensors)
    changed[name] = tensors[name].clone() + 1
    assert tensors_sha256(changed) != reference
    renamed = {("x" + k if k == name else k): v for k, v in tensors.items()}
    assert tensors_sha256(renamed) != reference


def test_channels_last_network_saves_the_same_artifact(saved: tuple[Path, MageNet], tmp_path: Path) -> None:
    path, network = saved
    network.to(memory_format=torch.channels_last)  # as CPU training and serving hold it
    again = tmp_path / "channels-last.safetensors"
    assert save_artifact(again, network, preset="tiny") == read_metadata(path)["tensors_sha256"]
    reloaded = load_artifact(again).model.state_dict()
    for name, tensor in network.state_dict().items():
        assert torch.equal(reloaded[name], tensor)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "absent.safetensors")


def test_truncated_file(saved: tuple[Path, MageNet], tmp_path: Path) -> None:
    path, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    raw = path.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match=r"truncated\.safetensors"):
        load_artifact(truncated)


def test_garbage_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a weights file")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(garbage)


def test_flipped_tensor_byte_fails_integrity(saved: tuple[Path, MageNet], tmp_path: Path) -> None:
    path, _ = saved
    raw = bytearray(path.read_bytes())
    position = data_offset(path) + (len(raw) - data_offset(path)) // 2
    raw[position] ^= 0xFF
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="integrity check"):
        load_artifact(flipped)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format", "someone-else", "not a fundus-enhance artifact"),
        ("format_version", "99", "format version '99'"),
        ("config", "{not json", "corrupt metadata"),
        ("config", json.dumps({"n_feat": 4, "unknown_width": 3}), "invalid model config"),
    ],
    ids=["format", "version", "config-json", "config-keys"],
)
def test_wrong_metadata(
    saved: tuple[Path, MageNet], tmp_path: Path, key: str, value: str, message: str
) -> None:
    path, network = saved
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in read_metadata(path).items()}
    metadata[key] = value
    tensors = {k: v.contiguous() for k, v in network.state_dict().items()}
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(edited)


def test_config_that_does_not_match_the_tensors(saved: tuple[Path, MageNet], tmp_path: Path) -> None:
    path, _ = saved
    other = MageNet(dataclasses.replace(get_preset("tiny"), n_feat=6))
    tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in read_metadata(path).items()}
    metadata["tensors_sha256"] = tensors_sha256(tensors)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata=metadata)
    with pytest.raises(ArtifactError, match="does not match its own config"):
        load_artifact(mismatched)


InfoMain = Callable[[Sequence[str] | None], int]


@pytest.fixture()
def info_cli() -> InfoMain:
    """The real ``fundus`` entry point (``service.cli.main``), every subcommand registered."""
    from service.cli import main

    return main


def test_info_preset_json(info_cli: InfoMain, capsys: pytest.CaptureFixture[str]) -> None:
    assert info_cli(["info", "--preset", "tiny", "--size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "tiny"
    assert info["parameters"] == sum(p.numel() for p in MageNet(get_preset("tiny")).parameters())
    assert 0 < info["vessel_parameters"] < info["parameters"]
    assert info["gflops_at_64"] > 0
    assert info["config"] == get_preset("tiny").to_dict()


def test_info_weights_json(
    info_cli: InfoMain, tiny_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert info_cli(["info", "--weights", str(tiny_artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "tiny"
    assert info["sha256"] == read_metadata(tiny_artifact)["tensors_sha256"]
    assert info["version"] == f"tiny-{info['sha256'][:12]}"
    assert info["training"] == {"note": "random weights for tests"}


def test_info_reports_errors(info_cli: InfoMain, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert info_cli(["info", "--preset", "huge", "--json"]) == 2
    assert "valid presets" in capsys.readouterr().out
    assert info_cli(["info", "--weights", str(tmp_path / "none.safetensors"), "--json"]) == 2
    assert "not found" in capsys.readouterr().out
