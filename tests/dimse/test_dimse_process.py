"""``python -m service.cli dicom-node`` as a real process: SIGKILL after accepting loses nothing, and the
Redis deployment (the node only holds the queue client; a worker runs the model)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from service.app import create_app
from service.dimse.node import DicomNode
from service.runner import load_runner
from service.settings import Settings
from tests.dicom.builders import PATIENT_ID, PATIENT_NAME, Variant, make_dicom
from tests.dimse.conftest import (
    NodeProcess,
    Orthanc,
    node_environment,
    patient_data_in,
    spool_counts,
    spool_empty,
    storescu,
    wait_for,
)
from tests.dimse.test_dimse_node import derived_by_source, source_uids, write_instances
from tests.redis.conftest import REDIS_SERVER, RedisServer
from tests.redis.helpers import worker_thread

pytestmark = pytest.mark.integration


def _spooled_ids(spool: Path) -> set[str]:
    incoming = {path.stem for path in (spool / "incoming").glob("*.dcm")}
    outbox = {path.name for path in (spool / "outbox").iterdir() if path.is_dir()}
    return incoming | outbox


def test_sigkill_after_accepting_then_restart_forwards_every_instance(
    orthanc_factory: Callable[..., Orthanc], tiny_artifact: Path, fundus_photo: np.ndarray, tmp_path: Path
) -> None:
    pacs = orthanc_factory(start=False)  # down while the first node runs: everything stays spooled
    spool = tmp_path / "spool"
    env = node_environment(
        tiny_artifact,
        spool,
        pacs.destination,
        FUNDUS_DIMSE_SEGMENT="true",
        FUNDUS_DIMSE_FORWARD_ORIGINAL="true",
    )
    first = NodeProcess(env, tmp_path / "node-1.log")
    second = NodeProcess(env, tmp_path / "node-2.log")
    try:
        first.start()
        files = write_instances(tmp_path / "in", fundus_photo, 6)
        storescu(first.dimse_port, files[:3])
        wait_for(
            lambda: spool_counts(spool)["outbox"] == 3, 60, "the first three derived and waiting to be sent"
        )
        storescu(first.dimse_port, files[3:])  # every C-STORE was answered with success...
        first.kill()  # ...and the process dies at once, the last ones most likely not processed yet
        assert len(_spooled_ids(spool)) == 6, spool_counts(spool)
        assert spool_counts(spool)["outbox"] >= 3

        pacs.start()
        second.start()
        wait_for(lambda: spool_empty(spool), 90, "the restarted node to forward everything")
        assert spool_counts(spool) == {"incoming": 0, "outbox": 0, "quarantine": 0, "failed": 0}
        instances = pacs.instances()
        sources = source_uids(files)
        enhanced = derived_by_source(instances, SecondaryCaptureImageStorage)
        segmentations = derived_by_source(instances, SegmentationStorage)
        originals = {str(ds.SOPInstanceUID) for ds in instances if ds.SOPInstanceUID in sources}
        assert set(enhanced) == sources and set(enhanced.values()) == {1}
        assert set(segmentations) == sources and set(segmentations.values()) == {1}
        assert originals == sources
        assert len(instances) == 3 * len(files)
        assert "resuming spooled items" in second.log()
    finally:
        first.close()
        second.close()
    # No patient data in the node's logs (instances appear as a short hash, items by a random id).
    logs = first.log() + second.log()
    assert "instance received" in logs
    leaked = patient_data_in(logs, [PATIENT_NAME, "Müller", PATIENT_ID, *source_uids(files)])
    assert leaked == []


def test_sigterm_stops_cleanly_and_keeps_unsent_items(
    orthanc_factory: Callable[..., Orthanc], tiny_artifact: Path, fundus_photo: np.ndarray, tmp_path: Path
) -> None:
    pacs = orthanc_factory(start=False)
    spool = tmp_path / "spool"
    node = NodeProcess(node_environment(tiny_artifact, spool, pacs.destination), tmp_path / "node.log")
    try:
        node.start()
        storescu(node.dimse_port, write_instances(tmp_path / "in", fundus_photo, 2))
        wait_for(lambda: spool_counts(spool)["outbox"] == 2, 60, "both instances processed")
        assert node.terminate() == 0
        assert spool_counts(spool)["outbox"] == 2  # nothing sent, nothing lost
        assert "dicom node stopped" in node.log()
    finally:
        node.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_queue_node_needs_only_the_queue_client(
    redis_server: RedisServer,
    node_factory: Callable[..., DicomNode],
    orthanc: Orthanc,
    tiny_artifact: Path,
    fundus_photo: np.ndarray,
    tmp_path: Path,
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        weights=tiny_artifact,
        device="cpu",
        redis_url=None,
        cpu_workers=1,
        log_level="WARNING",
        dicomweb_url=None,
    )
    runner, artifact = load_runner(settings)
    upload = make_dicom(fundus_photo, Variant("op", "RGB", "jpegls"))
    path = tmp_path / "photo.dcm"
    path.write_bytes(upload)
    with worker_thread(redis_server.url, runner.run_jobs, model_version=artifact.version, max_batch_size=4):
        node = node_factory(orthanc.destination, redis_url=redis_server.url)
        assert node.runner is None  # the model runs in the worker only
        storescu(node.dimse_port, [path])
        wait_for(lambda: orthanc.count() == 1, 60, "the derived instance in Orthanc")
    (derived,) = orthanc.instances()
    assert artifact.version in list(derived.ContributingEquipmentSequence[0].SoftwareVersions)
    with TestClient(create_app(settings)) as client:
        response = client.post("/enhance", content=upload, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text[:300]
    via_http = pydicom.dcmread(io.BytesIO(response.content))
    np.testing.assert_array_equal(derived.pixel_array, via_http.pixel_array)
    assert derived.DerivationDescription == via_http.DerivationDescription
