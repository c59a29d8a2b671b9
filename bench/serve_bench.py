"""Serving benchmark: the same model as a bare batched loop, through the service with batching, and unbatched.

Measures, in one run on one machine:
  (a) ``bare``: ``ModelRunner.infer`` on pre-made working-size batches (no HTTP, no codecs);
  (b) ``service``: ``fundus serve`` (a real uvicorn subprocess, embedded queue) driven over HTTP with a
      closed loop of N concurrent clients posting a 512² PNG, for each ``--concurrency`` level;
  (c) ``unbatched``: the same service with ``FUNDUS_MAX_BATCH_SIZE=1`` at the highest concurrency.
Prints one JSON object: images/s, p50/p99 latency, mean batch size, and the ratios service/bare and
batched/unbatched (with the bare model's own batch-N/batch-1 rate, the ceiling of the latter), plus
the API overhead (end-to-end minus the model time reported in Server-Timing) at concurrency 1.
Every service run also reports the CPU time the server's processes used per answered image
(``server_cpu_ms_per_image``, from /proc: steadier than wall time on a shared machine) and what
that means per core (``images_per_s_per_core`` = 1000 / it).

``--identity`` replaces the model by an identity pass (``bench/identity_serve.py``; a benchmark
option, not a setting) to measure the HTTP path's own capacity: the service at each concurrency for
each ``--workers`` count (``1,2`` compares one process with two API processes + the model process),
with the ratio of the largest to the smallest worker count.

    python bench/serve_bench.py                     # lite preset, random weights
    python bench/serve_bench.py --weights W.safetensors --requests 64 --concurrency 1,4,16
    python bench/serve_bench.py --identity --workers 1,2 --concurrency 1,16 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.artifact import save_artifact  # noqa: E402
from model.magenet import MageNet  # noqa: E402
from model.presets import get_preset  # noqa: E402
from service.codecs import default_registry  # noqa: E402
from service.imaging import decode_upload, prepare  # noqa: E402
from service.runner import load_runner, prepare_model_process  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.upload import Upload  # noqa: E402

_INFERENCE = re.compile(r"inference;dur=([0-9.]+)")
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def test_image(size: int = 512) -> bytes:
    """A 512² PNG: a photograph from the data pack when present, else a synthetic fundus disc."""
    pack = REPO_ROOT.parent / "shared" / "data" / "deepdrid" / "images"
    candidates = sorted(pack.glob("*.jpg")) if pack.is_dir() else []
    if candidates:
        image = Image.open(candidates[0]).convert("RGB").resize((size, size))
    else:
        rng = np.random.default_rng(0)
        ys, xs = np.mgrid[:size, :size]
        inside = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 <= (0.45 * size) ** 2
        array = np.zeros((size, size, 3), np.uint8)
        array[inside] = np.clip(
            np.array([170, 80, 35]) + rng.integers(-25, 25, (int(inside.sum()), 3)), 0, 255
        )
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_weights(args: argparse.Namespace, folder: Path) -> Path:
    if args.weights:
        return Path(args.weights)
    torch.manual_seed(0)
    path = folder / f"{args.preset}-random.safetensors"
    save_artifact(
        path, MageNet(get_preset(args.preset)), preset=args.preset, training={"note": "random weights"}
    )
    return path


def bench_bare(weights: Path, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Batched model loop on working-size tensors made by the service's own preprocessing."""
    settings = Settings(
        weights=weights,
        device=args.device,
        torch_threads=args.torch_threads,
        max_batch_size=args.max_batch_size,
    )
    prepare_model_process(settings)  # as `fundus serve` does
    runner, artifact = load_runner(settings)
    device, size = runner.device, runner.working_size
    decoded = decode_upload(default_registry(), Upload(image, "image/png"), max_pixels=10**8, min_side=1)
    working = prepare(decoded, size).model_input()
    runner.warm_up((1, args.max_batch_size))
    batch = np.stack([working] * args.max_batch_size)
    total = 0
    started = time.perf_counter()
    while total < args.requests:
        count = min(args.max_batch_size, args.requests - total)
        runner.infer(batch[:count], need_image=True, need_vessels=False)
        total += count
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    single = []
    for _ in range(args.single_reps):
        clock = time.perf_counter()
        runner.infer(batch[:1], need_image=True, need_vessels=False)
        single.append(time.perf_counter() - clock)
    return {
        "images": total,
        "batch_size": args.max_batch_size,
        "images_per_s": total / elapsed,
        "batch1_model_ms_p50": percentile(single, 50) * 1000.0,
        "preset": artifact.preset,
        "working_size": size,
        "parameters": artifact.parameter_count,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and all its live descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(times.get(pid, 0.0) for pid in tree)


@dataclasses.dataclass
class Server:
    """A running ``fundus serve``: its base URL and main process id."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        return _process_tree_cpu_s(self.pid)


@contextlib.contextmanager
def server(
    weights: Path, args: argparse.Namespace, max_batch_size: int, workers: int = 1, identity: bool = False
) -> Iterator[Server]:
    """``fundus serve`` (or the identity wrapper) in a subprocess; yields it once /readyz answers 200."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        FUNDUS_WEIGHTS=str(weights),
        FUNDUS_DEVICE=args.device,
        FUNDUS_HOST="127.0.0.1",
        FUNDUS_PORT=str(port),
        FUNDUS_MAX_BATCH_SIZE=str(max_batch_size),
        FUNDUS_MAX_BATCH_WAIT_MS=str(args.max_wait_ms),
        FUNDUS_MAX_QUEUE=str(max(64, 4 * max(args.concurrency))),
        FUNDUS_REQUEST_TIMEOUT_S="3600",
        FUNDUS_LOG_LEVEL="WARNING",
        FUNDUS_TORCH_THREADS=str(args.torch_threads),
        FUNDUS_API_KEYS="",
        FUNDUS_WORKERS=str(workers),
        FUNDUS_WORKER_METRICS_PORT="0",
    )
    env.pop("FUNDUS_REDIS_URL", None)
    env.pop("FUNDUS_MODEL_SOCKET", None)
    entry = [str(REPO_ROOT / "bench" / "identity_serve.py")] if identity else ["-m", "service.cli", "serve"]
    command = [sys.executable, *entry]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + args.startup_timeout_s
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"server exited during start-up:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready in time")
                time.sleep(0.2)  # start-up polling
            yield Server(url=url, pid=process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def drive(target: Server, image: bytes, concurrency: int, requests: int) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients post the image until ``requests`` answers arrived."""
    url = target.url
    latencies: list[float] = []
    overheads: list[float] = []
    batch_sizes: list[int] = []
    # Server-Timing parts (pre, queue, inference, post) and what is left: HTTP, hops, client.
    parts: dict[str, list[float]] = {}
    failures = 0
    issued = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued, failures
        while issued < requests:
            issued += 1
            clock = time.perf_counter()
            response = await client.post("/enhance", content=image, headers={"content-type": "image/png"})
            elapsed = time.perf_counter() - clock
            if response.status_code != 200:
                failures += 1
                continue
            latencies.append(elapsed)
            batch_sizes.append(int(response.headers.get("x-batch-size", "1")))
            timing = response.headers.get("server-timing", "")
            match = _INFERENCE.search(timing)
            if match:
                overheads.append(elapsed - float(match.group(1)) / 1000.0)
            durations = {name: float(ms) for name, ms in _TIMING.findall(timing)}
            durations["unaccounted"] = elapsed * 1000.0 - sum(durations.values())
            for name, ms in durations.items():
                parts.setdefault(name, []).append(ms)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        warm = [
            client.post("/enhance", content=image, headers={"content-type": "image/png"})
            for _ in range(concurrency)
        ]
        await asyncio.gather(*warm)
        cpu_before = target.cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_ms_per_image = (target.cpu_seconds() - cpu_before) * 1000.0 / max(1, len(latencies))
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failures": failures,
        "images_per_s": len(latencies) / elapsed,
        "latency_ms_p50": percentile(latencies, 50) * 1000.0,
        "latency_ms_p99": percentile(latencies, 99) * 1000.0,
        "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else 0.0,
        "overhead_ms_p50": percentile(overheads, 50) * 1000.0,
        "server_timing_ms_p50": {name: round(percentile(values, 50), 2) for name, values in parts.items()},
        "server_cpu_ms_per_image": cpu_ms_per_image,
        "images_per_s_per_core": 1000.0 / cpu_ms_per_image if cpu_ms_per_image > 0 else float("nan"),
    }


def identity_report(weights: Path, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """The HTTP path's own capacity: the identity model at each concurrency, for each worker count."""
    runs: dict[str, dict[str, Any]] = {}
    for workers in args.workers:
        with server(weights, args, args.max_batch_size, workers=workers, identity=True) as target:
            runs[str(workers)] = {
                str(c): asyncio.run(drive(target, image, c, args.requests)) for c in args.concurrency
            }
    top, low, high = max(args.concurrency), str(min(args.workers)), str(max(args.workers))
    return {
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "image": "512x512 PNG",
        "model": "identity (bench/identity_serve.py)",
        "max_batch_size": args.max_batch_size,
        "service_by_workers": runs,
        "ratios": {
            f"workers_{high}_over_{low}_images_per_s_at_{top}": runs[high][str(top)]["images_per_s"]
            / runs[low][str(top)]["images_per_s"],
            f"images_per_s_per_core_at_{top}_workers_{high}": runs[high][str(top)]["images_per_s_per_core"],
            "api_overhead_ms_p50_at_1_workers_1": runs[low][str(min(args.concurrency))]["overhead_ms_p50"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", help="artifact to serve (default: random weights of --preset)")
    parser.add_argument("--preset", default="lite", help="preset for random weights (tiny, lite, mid, paper)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--requests", type=int, default=32, help="measured requests per configuration")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrency levels")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = torch default")
    parser.add_argument("--single-reps", type=int, default=5, help="batch-1 passes timed for the bare model")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--workers",
        default="1",
        help="FUNDUS_WORKERS of the server (API processes); a comma list with --identity compares them",
    )
    parser.add_argument(
        "--identity", action="store_true", help="replace the model by an identity pass (HTTP path capacity)"
    )
    parser.add_argument(
        "--peer",
        choices=("none", "ray"),
        default="none",
        help="also serve the same /enhance work with Ray Serve (FastAPI ingress + @serve.batch, "
        "bench/ray_http_peer.py) and compare at the highest concurrency",
    )
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    image = test_image()

    if args.identity:
        with tempfile.TemporaryDirectory() as folder:
            report = identity_report(make_weights(args, Path(folder)), image, args)
        print(json.dumps(report, indent=2))
        return 0

    workers = max(args.workers)
    with tempfile.TemporaryDirectory() as folder:
        weights = make_weights(args, Path(folder))
        bare = bench_bare(weights, image, args)
        with server(weights, args, args.max_batch_size, workers=workers) as target:
            batched = {c: asyncio.run(drive(target, image, c, args.requests)) for c in args.concurrency}
        top, low = max(args.concurrency), min(args.concurrency)
        with server(weights, args, 1, workers=workers) as target:
            unbatched = asyncio.run(drive(target, image, top, args.requests))
        peer = ray_peer(weights, image, args, top, workers) if args.peer == "ray" else None

    result = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "image": "512x512 PNG",
        "workers": workers,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "bare": bare,
        "service": {str(c): stats for c, stats in batched.items()},
        "unbatched": unbatched,
        "ratios": {
            f"service_over_bare_at_{top}": batched[top]["images_per_s"] / bare["images_per_s"],
            f"batched_over_unbatched_at_{top}": batched[top]["images_per_s"] / unbatched["images_per_s"],
            # The most batching can give through any service: the model's own batch-N vs batch-1 rate.
            "bare_batched_over_batch1": bare["images_per_s"] * bare["batch1_model_ms_p50"] / 1000.0,
            f"api_overhead_ms_p50_at_{low}": batched[low]["overhead_ms_p50"],
        },
    }
    if peer is not None:
        result["ray_serve"] = peer
        result["ratios"][f"service_over_ray_serve_at_{top}"] = (
            batched[top]["images_per_s"] / peer["images_per_s"]
        )
    print(json.dumps(result, indent=2))
    return 0


def ray_peer(
    weights: Path, image: bytes, args: argparse.Namespace, concurrency: int, ingress: int
) -> dict[str, Any]:
    """The Ray Serve peer (:mod:`bench.ray_http_peer`) at ``concurrency``, on the same weights, batch
    size and wait, with as many ingress replicas as the service has API processes."""
    from model.artifact import read_metadata

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from ray_http_peer import ray_enhance_server

    working_size = int(read_metadata(weights)["config"]["working_size"])
    # Ray prints to stdout; keep stdout for this script's JSON.
    with (
        contextlib.redirect_stdout(sys.stderr),
        ray_enhance_server(
            weights,
            port=free_port(),
            working_size=working_size,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            torch_threads=args.torch_threads,
            ingress_replicas=ingress,
            cpus=os.cpu_count() or 1,
        ) as url,
    ):
        stats = asyncio.run(drive(Server(url=url, pid=os.getpid()), image, concurrency, args.requests))
    # The peer runs inside this process tree, clients included, so its CPU figures are not comparable,
    # and it sends no batch-size or Server-Timing headers.
    kept = ("concurrency", "requests", "failures", "images_per_s", "latency_ms_p50", "latency_ms_p99")
    return {k: v for k, v in stats.items() if k in kept}


if __name__ == "__main__":
    sys.exit(main())
