"""Prometheus metrics of ``fundus dicom-node`` (``fundus_dimse_*``), served on its own HTTP port.

The node does the API's image work, so it registers its collectors in a :class:`service.metrics.Metrics`
registry: the batch, queue-wait, pre/post-processing and trust-signal histograms keep the API's names
and one dashboard panel covers both front doors. The ``fundus_dimse_*`` series are the node's own.
Labels are bounded sets (outcome, kind, stage, error code); never a UID, AE title or anything from a file.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics import Metrics

#: Forward latency (C-STORE received → last derived instance accepted by the destination): a healthy
#: node answers in well under a second, one whose destination was down for an hour in an hour.
FORWARD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
KINDS = ("original", "enhanced", "segmentation")
SPOOL_STATES = ("incoming", "outbox", "quarantine", "failed")


class DimseMetrics:
    """The node's collectors, added to the registry of a :class:`Metrics`."""

    def __init__(self, base: Metrics | None = None) -> None:
        self.base = base or Metrics()
        r: CollectorRegistry = self.base.registry
        self.received = Counter(
            "fundus_dimse_received_total",
            "Instances received by C-STORE and spooled durably (answered with success)",
            registry=r,
        )
        self.refused = Counter(
            "fundus_dimse_refused_total",
            "C-STORE requests answered with a failure status, by reason",
            ["reason"],
            registry=r,
        )
        self.forwarded = Counter(
            "fundus_dimse_forwarded_total",
            "Instances the destination accepted, by kind (original, enhanced, segmentation)",
            ["kind"],
            registry=r,
        )
        for kind in KINDS:
            self.forwarded.labels(kind=kind)
        self.failed = Counter(
            "fundus_dimse_failed_total",
            "Failures by stage (process: quarantined; send: a failed delivery attempt; set_aside) and code",
            ["stage", "reason"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "fundus_dimse_spool_depth", "Items in each spool state", ["state"], registry=r
        )
        self.forward_latency = Histogram(
            "fundus_dimse_forward_latency_seconds",
            "Time from the C-STORE of an instance to the destination accepting all its derived instances",
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.associations = Counter(
            "fundus_dimse_associations_total",
            "Incoming associations, by result (accepted, rejected, aborted, refused_host)",
            ["result"],
            registry=r,
        )
        self.active_associations = Gauge(
            "fundus_dimse_active_associations", "Incoming associations open now", registry=r
        )
        self.destination_up = Gauge(
            "fundus_dimse_destination_up",
            "1 when the last association with the destination was established, else 0",
            registry=r,
        )
        self.in_process = Gauge(
            "fundus_dimse_in_process", "Instances being decoded, enhanced or encoded now", registry=r
        )

    @property
    def registry(self) -> CollectorRegistry:
        return self.base.registry

    def track_spool(self, depth: Callable[[str], int]) -> None:
        """Read the spool's depth per state from disk at scrape time (it is the truth after a restart)."""
        for state in SPOOL_STATES:
            self.spool_depth.labels(state=state).set_function(lambda state=state: float(depth(state)))
