"""What the trust signals add to ``/enhance`` latency, measured as a ratio in one run.

Two apps are started in this process on the same weights: one with everything on (the default:
quality grades before and after, stage-disagreement uncertainty, structure fidelity), one with
``FUNDUS_TRUST_SIGNALS=false`` and no quality grader. Requests alternate between them (so load from
anything else on the machine hits both alike) with the bundled sample photograph; the answer is the
median latency of each and their ratio, plus the median per-stage timings the server reports.

Usage: ``python bench/trust_bench.py [--weights W] [--repeats 12] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from model.artifact import BUNDLED_WEIGHTS
from service.app import create_app
from service.commands.sample import SAMPLE
from service.settings import Settings


def settings(weights: str, threads: int, trust: bool) -> Settings:
    values: dict[str, Any] = {
        "weights": weights,
        "device": "cpu",
        "torch_threads": threads,
        "log_level": "WARNING",
        "api_keys": "",
        "redis_url": None,
        "trust_signals": trust,
    }
    if not trust:
        values["quality_weights"] = ""
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        out[name] = float(duration)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS))
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    photo = SAMPLE.read_bytes()
    headers = {"content-type": "image/jpeg"}
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    timings: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with (
        TestClient(create_app(settings(args.weights, args.threads, True))) as on,
        TestClient(create_app(settings(args.weights, args.threads, False))) as off,
    ):
        clients = {"on": on, "off": off}
        for name, client in clients.items():  # warm-up
            assert client.post("/enhance", content=photo, headers=headers).status_code == 200, name
        for repeat in range(args.repeats):
            order = ("on", "off") if repeat % 2 == 0 else ("off", "on")
            for name in order:
                start = time.perf_counter()
                response = clients[name].post("/enhance", content=photo, headers=headers)
                latencies[name].append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
                timings[name].append(server_timing(response.headers["server-timing"]))
    median = {name: statistics.median(values) for name, values in latencies.items()}
    stages = {
        name: {key: round(statistics.median(t[key] for t in rows), 1) for key in rows[0]}
        for name, rows in timings.items()
    }
    print(
        json.dumps(
            {
                "photo_bytes": len(photo),
                "repeats": args.repeats,
                "threads": args.threads,
                "median_s": {k: round(v, 3) for k, v in median.items()},
                "server_timing_median_ms": stages,
                "trust_over_plain": round(median["on"] / median["off"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
