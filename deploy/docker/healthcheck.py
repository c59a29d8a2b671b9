"""Container health probe for the fundus-enhance image (standard library only, so the image needs no curl).

``healthcheck.py api``    GET ``/readyz`` of ``fundus serve`` on ``FUNDUS_PORT``: healthy only on 200.
``healthcheck.py worker`` GET ``/metrics`` of ``fundus worker`` on ``FUNDUS_WORKER_METRICS_PORT``:
                          healthy only when the worker reports its Redis link up
                          (``fundus_worker_redis_up`` at 1 or more).

Exit status 0 means healthy, 1 unhealthy; one line on stdout says why (Docker keeps it in the health log).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_TIMEOUT_S = 4.0
WORKER_UP_METRIC = "fundus_worker_redis_up"


def _fetch(url: str, timeout: float) -> tuple[int, str]:
    """Status code and body of a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def probe_api(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Readiness of the API: ``/readyz`` answers 200 once weights, queue and a worker are usable."""
    status, body = _fetch(f"http://{host}:{port}/readyz", timeout)
    return status == 200, f"/readyz {status} {body.strip()[:200]}"


def worker_up_value(exposition: str) -> float | None:
    """Value of the ``fundus_worker_redis_up`` sample in a Prometheus text exposition, or None when absent."""
    for line in exposition.splitlines():
        name, _, rest = line.partition(" ")
        if name == WORKER_UP_METRIC or name.startswith(WORKER_UP_METRIC + "{"):
            if name.startswith(WORKER_UP_METRIC + "{"):
                rest = line[line.index("}") + 1 :]
            try:
                return float(rest.split()[0])
            except (IndexError, ValueError):
                return None
    return None


def probe_worker(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Liveness of a model worker: its metrics endpoint answers and reports itself up."""
    status, body = _fetch(f"http://{host}:{port}/metrics", timeout)
    if status != 200:
        return False, f"worker metrics {status}"
    value = worker_up_value(body)
    if value is None:
        return False, f"{WORKER_UP_METRIC} missing from the worker metrics"
    return value >= 1, f"{WORKER_UP_METRIC} {value:g}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    role = args[0] if args else "api"
    host = os.environ.get("FUNDUS_HEALTHCHECK_HOST", "127.0.0.1")
    timeout = float(os.environ.get("FUNDUS_HEALTHCHECK_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    try:
        if role == "api":
            healthy, reason = probe_api(host, int(os.environ.get("FUNDUS_PORT", "8000")), timeout)
        elif role == "worker":
            port = int(os.environ.get("FUNDUS_WORKER_METRICS_PORT", "9100"))
            healthy, reason = probe_worker(host, port, timeout)
        else:
            print(f"unknown role {role!r}; use 'api' or 'worker'")  # noqa: T201
            return 2
    except (OSError, ValueError) as error:
        healthy, reason = False, f"{role} probe failed: {error}"
    print(("healthy: " if healthy else "unhealthy: ") + reason)  # noqa: T201
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
