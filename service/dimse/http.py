"""The node's small HTTP side: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` (probes).

Standard library only (``http.server`` in a daemon thread): the node has no web API, and pulling
uvicorn in for three GET routes would add an event loop to a process whose loop is busy with images.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("fundus.dimse.http")


class ProbeServer:
    """Serves the node's metrics and probes on ``host:port`` (0 = any free port, see :attr:`port`).

    Args:
        registry: the collectors to expose.
        readiness: returns ``(ready, reason)``; called per ``/readyz`` request from a server thread.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, readiness: Callable[[], tuple[bool, str]]
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        handler = self._handler_class()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="fundus-dimse-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fundus-dicom-node"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(200, {"status": "ok"})
                elif path == "/readyz":
                    try:
                        ready, reason = owner.readiness()
                    except Exception as exc:  # a probe must answer, whatever went wrong
                        ready, reason = False, type(exc).__name__
                    if ready:
                        self._json(200, {"status": "ready"})
                    else:
                        self._json(503, {"status": "not ready", "reason": reason})
                else:
                    self._json(404, {"error": {"code": "not_found", "message": "no such path"}})

            def _json(self, status: int, body: dict[str, object]) -> None:
                self._send(status, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("probe request", extra={"path": self.path.split("?", 1)[0]})

        return Handler
