"""The Storage SCP (pynetdicom): C-ECHO, and C-STORE of fundus photographs into the spool.

What it accepts:
- SOP classes: Ophthalmic Photography 8 and 16 bit, VL Photographic and Secondary Capture images
  (the single-frame photograph classes of :data:`service.dicom.reader.PHOTOGRAPH_SOP_CLASSES`);
  Verification for C-ECHO.
- Transfer syntaxes: implicit and explicit VR little endian, and every compressed syntax the HTTP
  path decodes on this installation (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE: only
  those for which pydicom has a working decoder are offered, as the reader checks).

Who may associate: ``FUNDUS_DIMSE_ALLOWED_AE_TITLES`` (others get A-ASSOCIATE-RJ "calling AE title
not recognised"), ``FUNDUS_DIMSE_ALLOWED_HOSTS`` (other peers' TCP connections are closed before any
PDU is read), the called AE title must be the node's, and at most ``FUNDUS_DIMSE_MAX_ASSOCIATIONS``
at once (more get a transient "local limit exceeded" rejection). ACSE, DIMSE and network timeouts
come from the settings.

A C-STORE is answered with success only after :meth:`Spool.accept` has made the data set durable;
a spool that cannot be written answers 0xA700 (out of resources) so the sender keeps the instance.
The data set is stored as received (no decoding here): checking and decoding happen in the pipeline,
where a bad instance is quarantined instead of failing the association.
"""

from __future__ import annotations

import hashlib
import logging
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    VLPhotographicImageStorage,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from service.dimse.config import Network, host_allowed
from service.dimse.metrics import DimseMetrics
from service.dimse.spool import Spool

log = logging.getLogger("fundus.dimse.scp")

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    VLPhotographicImageStorage,
    SecondaryCaptureImageStorage,
)
"""Storage SOP classes the node accepts (all read by :func:`service.dicom.reader.read_dicom`)."""

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_COMPRESSED = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: Largest PDU the node receives: 256 KiB (pynetdicom's default is 16 KiB) cuts the per-PDU cost of
#: multi-megabyte photographs; the peer negotiates down if it wants smaller ones.
MAX_PDU_BYTES = 256 * 1024

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

# pynetdicom's "standard" handlers format every PDU and DIMSE message for DEBUG logs; nothing of it is
# wanted (the service's own log lines carry no patient data), so they are not bound at all.
_config.LOG_HANDLER_LEVEL = "none"


def accepted_transfer_syntaxes() -> list[UID]:
    """Uncompressed syntaxes plus the compressed ones pydicom can decode here (as the reader checks)."""
    syntaxes = list(_UNCOMPRESSED)
    for syntax in _COMPRESSED:
        try:
            if get_decoder(syntax).is_available:
                syntaxes.append(syntax)
        except NotImplementedError:
            continue
    return syntaxes


def instance_ref(sop_instance_uid: object) -> str:
    """A short, stable hash of a SOP Instance UID for log lines (correlates without quoting the UID)."""
    return hashlib.sha256(str(sop_instance_uid or "").encode()).hexdigest()[:12]


class _FilteringServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a peer-address allow-list checked before any PDU is read."""

    allowed_networks: ClassVar[list[Network]] = []
    on_refused: Callable[[], None] | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if host_allowed(str(host), self.allowed_networks):
            return True
        log.warning("connection refused: peer address not allowed", extra={"peer": str(host)})
        if self.on_refused is not None:
            self.on_refused()
        return False

    def shutdown(self) -> None:
        """Stop serving and close the socket (without pynetdicom's bookkeeping of AE.start_server)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageSCP:
    """Accepts associations and stores received instances in the spool.

    Args:
        settings: the node's settings (AE title, bind address, port, limits, timeouts).
        spool: where received data sets go.
        metrics: the node's collectors.
        allowed_ae_titles: calling AE titles allowed (empty: any).
        allowed_networks: peer networks allowed (empty: any).
        on_received: called with the item id after each durable store (from an association thread).
        max_instance_bytes: data sets larger than this are refused with 0xA700.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        metrics: DimseMetrics,
        allowed_ae_titles: list[str],
        allowed_networks: list[Network],
        on_received: Callable[[str], None],
        max_associations: int,
        acse_timeout_s: float,
        dimse_timeout_s: float,
        network_timeout_s: float,
        max_instance_bytes: int,
    ) -> None:
        self.host = host
        self.port = port
        self.spool = spool
        self.metrics = metrics
        self.on_received = on_received
        self.max_instance_bytes = max_instance_bytes
        self.allowed_networks = allowed_networks
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = acse_timeout_s
        ae.dimse_timeout = dimse_timeout_s
        ae.network_timeout = network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(allowed_ae_titles)
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification, list(_UNCOMPRESSED))
        self.ae = ae
        self.server: _FilteringServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a daemon thread (raises OSError when the port is taken)."""
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = self.ae.make_server(
            (self.host, self.port), evt_handlers=handlers, server_class=_FilteringServer
        )
        assert isinstance(server, _FilteringServer)
        server.allowed_networks = self.allowed_networks
        server.on_refused = lambda: self.metrics.associations.labels(result="refused_host").inc()
        self.server = server
        self.metrics.active_associations.set_function(lambda: float(len(server.active_associations)))
        self._thread = threading.Thread(target=server.serve_forever, name="fundus-dimse-scp", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop accepting associations, let open ones finish within ``timeout_s``, abort the rest.

        Instances already answered with success are in the spool, so an abort loses nothing acknowledged.
        """
        server = self.server
        if server is None:
            return
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        deadline = time.monotonic() + max(0.0, timeout_s)
        for assoc in server.active_associations:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        for assoc in server.active_associations:
            if assoc.is_alive():
                assoc.abort()
        self.server = None

    # -- event handlers (run in association threads) ---------------------------------------------------

    def _handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> int:
        request = event.request
        ref = instance_ref(getattr(request, "AffectedSOPInstanceUID", ""))
        try:
            data = event.encoded_dataset()
        except Exception as exc:  # a malformed request; the association goes on
            reason = type(exc).__name__
            log.warning("C-STORE without a readable data set", extra={"instance": ref, "reason": reason})
            self.metrics.refused.labels(reason="no_dataset").inc()
            return STATUS_CANNOT_UNDERSTAND
        if len(data) > self.max_instance_bytes:
            log.warning("C-STORE refused: data set too large", extra={"instance": ref, "bytes": len(data)})
            self.metrics.refused.labels(reason="too_large").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            item_id = self.spool.accept(data)
        except OSError as exc:
            log.error("C-STORE refused: spool not writable", extra={"instance": ref, "errno": exc.errno})
            self.metrics.refused.labels(reason="spool_error").inc()
            return STATUS_OUT_OF_RESOURCES
        self.metrics.received.inc()
        log.info(
            "instance received",
            extra={
                "item": item_id,
                "instance": ref,
                "calling_ae": event.assoc.requestor.ae_title,
                "bytes": len(data),
            },
        )
        try:
            self.on_received(item_id)
        except Exception:  # the item is durable: it is picked up at the next start at the latest
            log.exception("could not schedule a received instance", extra={"item": item_id})
        return STATUS_SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        self.metrics.associations.labels(result="accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        self.metrics.associations.labels(result="rejected").inc()
        requestor = event.assoc.requestor
        log.warning(
            "association rejected",
            extra={"calling_ae": requestor.ae_title, "peer": requestor.address},
        )

    def _on_aborted(self, event: evt.Event) -> None:
        self.metrics.associations.labels(result="aborted").inc()
