"""The DICOM node end to end with real peers: dcmtk as the camera, Orthanc (DIMSE) as the PACS.

Every test starts its own Orthanc and node on free loopback ports; completion is awaited by polling
Orthanc's REST API and the node's spool and metrics with deadlines.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from service.app import create_app
from service.dimse.node import DicomNode
from service.settings import Settings
from tests.dicom.builders import PATIENT_ID, PATIENT_NAME, SERIES_UID, STUDY_UID, Variant, make_dicom
from tests.dimse.conftest import (
    CAMERA_AE,
    Orthanc,
    echoscu,
    metric,
    patient_data_in,
    spool_counts,
    spool_empty,
    start_storescu,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

DICOM = "application/dicom"
MIXED = [
    Variant("op", "RGB", "raw"),
    Variant("op", "YBR_FULL_422", "jpeg"),
    Variant("sc", "RGB", "raw"),
    Variant("op", "RGB", "jpegls"),
    Variant("op", "RGB", "j2k"),
    Variant("sc", "MONOCHROME2", "raw"),
]


def write_instances(
    directory: Path, rgb: np.ndarray, count: int, variants: list[Variant] = MIXED
) -> list[Path]:
    """``count`` Part-10 files (each with its own SOP Instance UID), cycling through ``variants``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"img{index:03d}.dcm"
        path.write_bytes(make_dicom(rgb, variants[index % len(variants)]))
        paths.append(path)
    return paths


def source_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}


def derived_by_source(instances: list[pydicom.Dataset], sop_class: str) -> Counter[str]:
    """How many derived instances of ``sop_class`` reference each source SOP Instance UID (forwarded
    originals, which may be Secondary Captures too, are not derived: their Image Type says ORIGINAL)."""
    counts: Counter[str] = Counter()
    for ds in instances:
        if ds.SOPClassUID != sop_class or str(ds.ImageType[0]) != "DERIVED":
            continue
        if sop_class == SegmentationStorage:
            ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        else:
            ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        counts[str(ref)] += 1
    return counts


def test_echo_and_store_give_the_same_derived_instance_as_http(
    node_factory: Callable[..., DicomNode],
    orthanc: Orthanc,
    fundus_photo: np.ndarray,
    tiny_artifact: Path,
    tmp_path: Path,
) -> None:
    node = node_factory(orthanc.destination)
    echo = echoscu(node.dimse_port)
    assert echo.returncode == 0, echo.stdout + echo.stderr

    upload = make_dicom(fundus_photo, Variant("op", "YBR_FULL_422", "jpeg"))
    path = tmp_path / "photo.dcm"
    path.write_bytes(upload)
    storescu(node.dimse_port, [path])
    wait_for(lambda: orthanc.count() == 1, 60, "the derived instance in Orthanc")
    wait_for(lambda: spool_empty(node.spool.root), 10, "the spool to empty")
    (derived,) = orthanc.instances()

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        weights=tiny_artifact,
        device="cpu",
        redis_url=None,
        cpu_workers=1,
        log_level="WARNING",
        dicomweb_url=None,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/enhance", content=upload, headers={"Content-Type": DICOM})
    assert response.status_code == 200, response.text[:300]
    via_http = pydicom.dcmread(io.BytesIO(response.content))

    source = pydicom.dcmread(io.BytesIO(upload))
    assert derived.SOPClassUID == SecondaryCaptureImageStorage
    assert derived.StudyInstanceUID == STUDY_UID
    assert str(derived.PatientName) == PATIENT_NAME and derived.PatientID == PATIENT_ID
    assert derived.SeriesInstanceUID not in (SERIES_UID, source.SeriesInstanceUID)
    assert derived.SeriesInstanceUID == via_http.SeriesInstanceUID  # the same derived series
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert list(derived.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    # The same pixels and the same trust-signal description as POST /enhance.
    assert derived.pixel_array.shape == fundus_photo.shape
    np.testing.assert_array_equal(derived.pixel_array, via_http.pixel_array)
    assert not np.array_equal(derived.pixel_array, source.pixel_array)  # it was enhanced, not copied
    assert derived.DerivationDescription == via_http.DerivationDescription
    assert "quality" in derived.DerivationDescription and "vessel dice" in derived.DerivationDescription
    assert (
        derived.ContributingEquipmentSequence[0].SoftwareVersions
        == via_http.ContributingEquipmentSequence[0].SoftwareVersions
    )

    port = node.metrics_port
    assert port is not None
    assert metric(port, "fundus_dimse_received_total") == 1
    assert metric(port, "fundus_dimse_forwarded_total", {"kind": "enhanced"}) == 1
    assert metric(port, "fundus_dimse_forward_latency_seconds_count") == 1
    assert metric(port, "fundus_dimse_spool_depth", {"state": "outbox"}) == 0
    assert metric(port, "fundus_dimse_destination_up") == 1


def test_destination_down_then_up_delivers_each_instance_exactly_once(
    node_factory: Callable[..., DicomNode],
    orthanc_factory: Callable[..., Orthanc],
    fundus_photo: np.ndarray,
    tmp_path: Path,
) -> None:
    pacs = orthanc_factory(start=False)  # its DICOM port is reserved but nothing listens yet
    node = node_factory(pacs.destination)
    port = node.metrics_port
    assert port is not None
    files = write_instances(tmp_path / "in", fundus_photo, 5)
    storescu(node.dimse_port, files)
    wait_for(lambda: spool_counts(node.spool.root)["outbox"] == 5, 60, "all five processed into the outbox")
    wait_for(
        lambda: (
            metric(port, "fundus_dimse_failed_total", {"stage": "send", "reason": "association_failed"}) >= 2
        ),
        30,
        "failed association attempts while the destination is down",
    )
    assert metric(port, "fundus_dimse_destination_up") == 0
    assert metric(port, "fundus_dimse_forwarded_total", {"kind": "enhanced"}) == 0

    pacs.start()
    wait_for(lambda: spool_empty(node.spool.root), 60, "the outbox to drain once the destination is up")
    instances = pacs.instances()
    counts = derived_by_source(instances, SecondaryCaptureImageStorage)
    assert set(counts) == source_uids(files)
    assert set(counts.values()) == {1}
    assert len(instances) == 5
    # Exactly once on the wire too: the node counted five successful C-STOREs, not more.
    assert metric(port, "fundus_dimse_forwarded_total", {"kind": "enhanced"}) == 5
    assert metric(port, "fundus_dimse_destination_up") == 1
    assert metric(port, "fundus_dimse_forward_latency_seconds_count") == 5


def test_fifty_instances_from_four_concurrent_associations(
    node_factory: Callable[..., DicomNode],
    orthanc: Orthanc,
    fundus_photo: np.ndarray,
    tmp_path: Path,
) -> None:
    node = node_factory(orthanc.destination)
    files = write_instances(tmp_path / "in", fundus_photo, 50)
    groups = [files[index::4] for index in range(4)]
    senders = [start_storescu(node.dimse_port, group) for group in groups]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output
    wait_for(lambda: orthanc.count() >= 50, 120, "fifty derived instances in Orthanc")
    wait_for(lambda: spool_empty(node.spool.root), 30, "the spool to empty")
    counts = derived_by_source(orthanc.instances(), SecondaryCaptureImageStorage)
    assert set(counts) == source_uids(files)
    assert set(counts.values()) == {1}
    assert spool_counts(node.spool.root) == {"incoming": 0, "outbox": 0, "quarantine": 0, "failed": 0}
    port = node.metrics_port
    assert port is not None
    assert metric(port, "fundus_dimse_received_total") == 50
    assert metric(port, "fundus_dimse_forwarded_total", {"kind": "enhanced"}) == 50
    assert metric(port, "fundus_dimse_associations_total", {"result": "accepted"}) == 4


def _corrupt_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG baseline instance whose compressed stream is garbage after its first bytes."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(rgb, Variant("op", "RGB", "jpeg"))))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:20] + bytes(range(256)) * 8])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_corrupt_and_unusable_instances_are_quarantined_and_the_node_keeps_serving(
    node_factory: Callable[..., DicomNode],
    orthanc: Orthanc,
    fundus_photo: np.ndarray,
    tmp_path: Path,
) -> None:
    node = node_factory(orthanc.destination)
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(_corrupt_jpeg(fundus_photo))
    flat = tmp_path / "flat.dcm"  # a uniform grey frame: clearly not a fundus photograph (422 no_fundus)
    flat.write_bytes(make_dicom(np.full_like(fundus_photo, 128), Variant("sc", "RGB", "raw")))
    good = write_instances(tmp_path / "good", fundus_photo, 2)
    storescu(node.dimse_port, [corrupt, good[0], flat, good[1]])

    wait_for(lambda: orthanc.count() == 2, 60, "the two good instances in Orthanc")
    wait_for(lambda: spool_counts(node.spool.root)["quarantine"] == 2, 30, "two quarantined instances")
    reasons = {node.spool.quarantine_reason(item)["code"] for item in node.spool.quarantined()}
    assert reasons == {"dicom_undecodable", "no_fundus"}
    for item in node.spool.quarantined():
        reason = node.spool.quarantine_reason(item)
        assert reason["stage"] == "process" and reason["http_status"] in (415, 422) and reason["message"]
        assert not patient_data_in(str(reason), [PATIENT_NAME, PATIENT_ID, "Müller"])
    wait_for(lambda: spool_empty(node.spool.root), 10, "the delivered items to leave the spool")
    # Still serving: an echo and one more instance go through.
    assert echoscu(node.dimse_port).returncode == 0
    more = write_instances(tmp_path / "more", fundus_photo, 1)
    storescu(node.dimse_port, more)
    wait_for(lambda: orthanc.count() == 3, 60, "the next instance in Orthanc")
    port = node.metrics_port
    assert port is not None
    assert metric(port, "fundus_dimse_failed_total", {"stage": "process", "reason": "no_fundus"}) == 1
    assert metric(port, "fundus_dimse_failed_total", {"stage": "process", "reason": "dicom_undecodable"}) == 1
    assert metric(port, "fundus_dimse_spool_depth", {"state": "quarantine"}) == 2


def test_calling_ae_title_and_peer_address_allow_lists(
    node_factory: Callable[..., DicomNode], orthanc: Orthanc, fundus_photo: np.ndarray, tmp_path: Path
) -> None:
    node = node_factory(orthanc.destination, dimse_allowed_ae_titles=f"{CAMERA_AE},OTHERCAM")
    allowed = echoscu(node.dimse_port, calling=CAMERA_AE)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    refused = echoscu(node.dimse_port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    files = write_instances(tmp_path / "in", fundus_photo, 1)
    store = storescu(node.dimse_port, files, calling="INTRUDER", check=False)
    assert store.returncode != 0
    assert "Rejected" in store.stdout + store.stderr
    wrong_called = echoscu(node.dimse_port, called="SOMEONEELSE")
    assert wrong_called.returncode != 0
    assert spool_counts(node.spool.root)["incoming"] == 0 and orthanc.count() == 0
    port = node.metrics_port
    assert port is not None
    wait_for(
        lambda: metric(port, "fundus_dimse_associations_total", {"result": "rejected"}) == 3,
        10,
        "three rejected associations in the metrics",
    )
    assert metric(port, "fundus_dimse_received_total") == 0

    fenced = node_factory(orthanc.destination, dimse_allowed_hosts="10.255.0.0/16, 192.0.2.7")
    assert echoscu(fenced.dimse_port).returncode != 0
    fenced_port = fenced.metrics_port
    assert fenced_port is not None
    wait_for(
        lambda: metric(fenced_port, "fundus_dimse_associations_total", {"result": "refused_host"}) == 1,
        10,
        "the refused connection in the metrics",
    )
    open_to_loopback = node_factory(orthanc.destination, dimse_allowed_hosts="127.0.0.0/8")
    assert echoscu(open_to_loopback.dimse_port).returncode == 0


def test_association_limit_rejects_the_extra_association(
    node_factory: Callable[..., DicomNode], orthanc: Orthanc
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory(orthanc.destination, dimse_max_associations=1)
    scu = AE(ae_title=CAMERA_AE)
    scu.add_requested_context(Verification)
    held = scu.associate("127.0.0.1", node.dimse_port, ae_title="FUNDUSNODE")
    try:
        assert held.is_established
        extra = echoscu(node.dimse_port)
        assert extra.returncode != 0
        assert "Local Limit Exceeded" in extra.stdout + extra.stderr
    finally:
        held.release()
    wait_for(
        lambda: echoscu(node.dimse_port).returncode == 0, 15, "a new association once the first one ended"
    )
