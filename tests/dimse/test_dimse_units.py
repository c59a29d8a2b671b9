"""The node's parts without peers: settings parsing, spool state transitions and crash leftovers, back-off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.dimse.config import (
    Destination,
    DimseConfigError,
    host_allowed,
    parse_ae_titles,
    parse_destination,
    parse_networks,
)
from service.dimse.forwarder import backoff_s, status_reason
from service.dimse.node import NodeConfig
from service.dimse.spool import NewPart, Spool, received_at
from service.settings import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@pacs.example.org:104", Destination("PACS", "pacs.example.org", 104)),
        ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
        (" AE WITH SPACE@10.0.0.5:11112 ", Destination("AE WITH SPACE", "10.0.0.5", 11112)),
        ("PACS@[fd00::5]:104", Destination("PACS", "fd00::5", 104)),
    ],
)
def test_destination_parses(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected
    assert parse_destination(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "pacs:104", "PACS@pacs", "PACS@pacs:0", "PACS@pacs:70000", "@pacs:104", "A\\B@pacs:104",
     "THIS-TITLE-IS-TOO-LONG@pacs:104", "PACS@[fd00::5:104"],
)  # fmt: skip
def test_destination_rejects_malformed_values(text: str) -> None:
    with pytest.raises(DimseConfigError, match="FUNDUS_DIMSE_DESTINATION"):
        parse_destination(text)


def test_allow_lists() -> None:
    assert parse_ae_titles("") == []
    assert parse_ae_titles(" CAM1, CAM2 ,") == ["CAM1", "CAM2"]
    with pytest.raises(DimseConfigError, match="ALLOWED_AE_TITLES"):
        parse_ae_titles("CAM1,WAY-TOO-LONG-FOR-AN-AE")
    networks = parse_networks("10.1.0.0/16, 192.0.2.7, fd00::/8")
    assert host_allowed("10.1.200.3", networks)
    assert host_allowed("192.0.2.7", networks) and not host_allowed("192.0.2.8", networks)
    assert host_allowed("::ffff:10.1.0.9", networks)  # an IPv4 peer on a dual-stack socket
    assert host_allowed("fd12::1", networks) and not host_allowed("fe80::1", networks)
    assert not host_allowed("not-an-address", networks)
    assert host_allowed("203.0.113.1", [])  # no list: everyone
    with pytest.raises(DimseConfigError, match="ALLOWED_HOSTS"):
        parse_networks("pacs.example.org")


def test_node_config_reads_the_settings() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        dimse_destination="PACS@10.0.0.2:104",
        dimse_allowed_ae_titles="CAM1",
        dimse_allowed_hosts="10.0.0.0/24",
    )
    config = NodeConfig.from_settings(settings)
    assert config.destination == Destination("PACS", "10.0.0.2", 104)
    assert config.allowed_ae_titles == ["CAM1"] and len(config.allowed_networks) == 1
    with pytest.raises(DimseConfigError, match="required"):
        NodeConfig.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


def _parts(data: bytes) -> list[NewPart]:
    return [
        NewPart("0-original.dcm", "original", "1.2.3", "1.2.840.10008.1.2.1", link_incoming=True),
        NewPart("1-enhanced.dcm", "enhanced", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", data=data),
    ]


def test_spool_moves_an_item_through_its_states(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    item_id = spool.accept(b"received bytes")
    assert spool.pending_incoming() == [item_id]
    assert spool.read_incoming(item_id) == b"received bytes"
    assert abs(received_at(item_id) - os.path.getmtime(spool.incoming_path(item_id))) < 5
    item = spool.commit(item_id, _parts(b"derived bytes"))
    assert spool.pending_incoming() == [] and spool.depth("incoming") == 0
    assert (item.directory / "0-original.dcm").read_bytes() == b"received bytes"
    assert (item.directory / "1-enhanced.dcm").read_bytes() == b"derived bytes"
    (loaded,) = spool.outbox_items()
    assert [part.file for part in loaded.unsent] == ["0-original.dcm", "1-enhanced.dcm"]
    loaded.parts[0].sent = True
    loaded.attempts = 2
    spool.save(loaded)
    (reloaded,) = spool.outbox_items()
    assert [part.kind for part in reloaded.unsent] == ["enhanced"] and reloaded.attempts == 2
    spool.finish(reloaded)
    assert spool.outbox_items() == [] and spool.depth("outbox") == 0
    assert list(spool.tmp.iterdir()) == []


def test_quarantine_and_set_aside_keep_the_data_and_say_why(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    bad = spool.accept(b"not dicom")
    spool.quarantine(bad, {"stage": "process", "code": "dicom_invalid", "message": "unreadable"})
    assert spool.quarantined() == [bad] and spool.depth("quarantine") == 1
    assert (spool.quarantine_dir / f"{bad}.dcm").read_bytes() == b"not dicom"
    assert spool.quarantine_reason(bad)["code"] == "dicom_invalid"
    stuck = spool.commit(spool.accept(b"x"), _parts(b"y"))
    stuck.attempts, stuck.last_error = 5, "cannot_understand 0xC000"
    spool.set_aside(stuck)
    assert spool.depth("outbox") == 0 and spool.depth("failed") == 1
    state = json.loads((spool.failed / stuck.item_id / "state.json").read_text())
    assert state["attempts"] == 5 and state["last_error"] == "cannot_understand 0xC000"


def test_open_repairs_what_a_crash_left_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    # A crash in the middle of a receive: a partial write, never acknowledged.
    (spool.tmp / "123-abc.part").write_bytes(b"half")
    # A crash between the outbox commit and the removal of the incoming file.
    committed = spool.accept(b"twice")
    item = spool.commit(committed, _parts(b"derived"))
    spool.incoming_path(committed).write_bytes(b"twice")
    # A crash while deleting a delivered item: it was already moved out of the outbox.
    (spool.tmp / "456-def.sent").mkdir()
    # An outbox item whose state file is unreadable.
    broken = spool.outbox / "789-bad"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    waiting = spool.accept(b"still to process")

    reopened = Spool(tmp_path / "spool")
    reopened.open()
    assert list(reopened.tmp.iterdir()) == []
    assert reopened.pending_incoming() == [waiting]
    assert [i.item_id for i in reopened.outbox_items()] == [item.item_id]
    assert reopened.depth("failed") == 1  # the unreadable one, set aside rather than lost


def test_backoff_doubles_up_to_the_cap() -> None:
    for failures, base in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 300.0), (500, 300.0)]:
        delay = backoff_s(failures, 2.0, 300.0)
        assert 0.8 * base <= delay <= 1.2 * base, (failures, delay)
    assert status_reason(0xA700) == "out_of_resources"
    assert status_reason(0xA900) == "dataset_mismatch"
    assert status_reason(0xC123) == "cannot_understand"
    assert status_reason(0x0110) == "failure"
