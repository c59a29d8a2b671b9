"""``fundus dicom-node``: a DICOM network node (DIMSE) between fundus cameras and the PACS.

Cameras C-STORE photographs to the node (a pynetdicom Storage SCP that also answers C-ECHO); each
instance is spooled durably, enhanced (and, if configured, segmented) through the same queue and
the same image steps as ``POST /enhance``, and the derived instances are C-STOREd to the destination
AE, with retries that survive restarts.

- :mod:`service.dimse.config`: destination and allow-list parsing.
- :mod:`service.dimse.spool`: the on-disk states (incoming → outbox → sent; quarantine; failed).
- :mod:`service.dimse.pipeline`: the HTTP path's decode/crop/restore/encode calls, shared.
- :mod:`service.dimse.scp`: the Storage SCP.
- :mod:`service.dimse.forwarder`: the Storage SCU towards the destination, with back-off.
- :mod:`service.dimse.node`: everything wired together, plus ``/metrics`` and the probes.
"""

from __future__ import annotations
