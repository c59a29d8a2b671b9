"""Queue backends side by side: embedded batcher, Redis Streams with 1 and 2 workers, and Ray Serve.

All targets serve the same weights with the same ``max_batch_size`` / ``max_batch_wait_ms`` and are
driven by one closed-loop asyncio client (N requests in flight, each a working-size uint8 job) at
the queue boundary: ``InferenceQueue.submit`` for ours, a ``DeploymentHandle`` call for Ray Serve
(whose ``@serve.batch`` method runs the same ``ModelRunner``). HTTP and codecs are left out on
purpose: they are identical in front of every backend and ``bench/serve_bench.py`` measures them.

Reports, per target and concurrency: throughput (jobs/s), p50/p95/p99 latency, mean batch size,
errors; the Redis hop cost (Redis 1 worker minus embedded at concurrency 1, p50 and mean, in ms);
and the ratios Redis/embedded and ours/Ray Serve for throughput and p50. Ray is a bench-only
dependency (``pip install 'ray[serve]'``); when it is missing or cannot start, the JSON says why.

    python bench/redis_bench.py                                 # tiny preset, small request counts
    python bench/redis_bench.py --preset lite --size 256 --requests 96 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.artifact import load_artifact, save_artifact  # noqa: E402
from model.device import reuse_freed_memory  # noqa: E402
from model.magenet import MageNet  # noqa: E402
from model.presets import get_preset  # noqa: E402
from service.queue.base import Job, JobResult, Task  # noqa: E402
from service.queue.embedded import EmbeddedQueue  # noqa: E402
from service.queue.redis_backend import RedisQueue  # noqa: E402
from service.runner import ModelRunner  # noqa: E402

Call = Callable[[Job], Awaitable[JobResult]]
CORES = os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- client


def make_jobs(count: int, size: int, timeout_s: float) -> list[Job]:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(3, size, size), dtype=np.uint8) for _ in range(8)]
    now = time.time()
    return [
        Job(request_id=f"b{i}", task=Task.ENHANCE, pixels=pixels[i % 8], deadline=now + timeout_s)
        for i in range(count)
    ]


async def drive(call: Call, size: int, concurrency: int, requests: int, timeout_s: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers each send the next job as soon as the previous returns."""
    queue = list(reversed(make_jobs(requests, size, timeout_s)))
    latencies: list[float] = []
    batches: list[int] = []
    errors: dict[str, int] = {}

    async def loop() -> None:
        while queue:
            job = queue.pop()
            job.deadline = time.time() + timeout_s
            job.enqueued_at = time.time()
            clock = time.perf_counter()
            try:
                result = await call(job)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - clock)
            batches.append(result.batch_size)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(latencies),
        "errors": errors,
        "throughput_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "mean_ms": round(float(ms.mean()), 2) if len(ms) else None,
        "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
    }


async def sweep(call: Call, args: argparse.Namespace) -> list[dict[str, Any]]:
    await drive(
        call, args.size, min(4, args.max_batch_size), args.warmup, args.timeout_s
    )  # warm-up, discarded
    rows = []
    for concurrency in args.concurrency:
        requests = max(args.requests if concurrency > 1 else args.requests_c1, concurrency)
        rows.append(await drive(call, args.size, concurrency, requests, args.timeout_s))
    return rows


# --------------------------------------------------------------------------------------------- targets


def build_runner(weights: Path, size: int, threads: int) -> ModelRunner:
    """A CPU runner set up like a service process (threads, heap reuse), at any working size."""
    torch.set_num_threads(threads)
    reuse_freed_memory()
    artifact = load_artifact(weights, "cpu")
    return ModelRunner(artifact.model, torch.device("cpu"), size)


@contextlib.asynccontextmanager
async def embedded_target(args: argparse.Namespace) -> AsyncIterator[Call]:
    runner = build_runner(args.weights, args.size, args.model_threads)
    runner.warm_up((1,))
    queue = EmbeddedQueue(
        runner.run_jobs,
        max_batch_size=args.max_batch_size,
        max_wait_s=args.max_batch_wait_ms / 1000.0,
        max_queue=4 * max(args.concurrency),
    )
    await queue.start()
    try:
        yield queue.submit
    finally:
        await queue.stop(5.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # start-up polling
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def redis_target(args: argparse.Namespace, workers: int, folder: Path) -> AsyncIterator[Call]:
    with redis_server(folder) as url:
        threads = args.model_threads
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "FUNDUS_TORCH_THREADS": str(threads),
            "FUNDUS_LOG_LEVEL": "WARNING",
            "OMP_NUM_THREADS": str(threads),
        }
        processes = []
        for index in range(workers):
            command = [sys.executable, "-m", "service.cli", "worker", "--redis-url", url]
            command += ["--weights", str(args.weights), "--device", "cpu", "--metrics-port", "0"]
            command += ["--name", f"bench-{index}", "--max-batch-size", str(args.max_batch_size)]
            command += ["--max-batch-wait-ms", str(args.max_batch_wait_ms)]
            log = (folder / f"worker-{workers}-{index}.log").open("wb")
            processes.append(
                subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        queue = RedisQueue(
            url,
            max_queue=4 * max(args.concurrency),
            request_timeout_s=args.timeout_s,
            working_size=args.size,
            monitor_interval_s=0.2,
        )
        await queue.start()
        try:
            deadline = time.monotonic() + 120
            while queue.live_workers() < workers:
                if any(p.poll() is not None for p in processes):
                    raise RuntimeError(f"a worker exited during start-up; see {folder}")
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not start within 120 s")
                await asyncio.sleep(0.1)  # start-up polling
            yield queue.submit
        finally:
            await queue.stop(5.0)
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


@contextlib.asynccontextmanager
async def ray_target(args: argparse.Namespace) -> AsyncIterator[Call]:
    """The same ModelRunner behind Ray Serve's ``@serve.batch`` (same batch size and wait)."""
    import ray
    from ray import serve

    max_batch_size = args.max_batch_size
    wait_s = args.max_batch_wait_ms / 1000.0
    weights, size, threads = str(args.weights), args.size, args.model_threads

    @serve.deployment(max_ongoing_requests=4 * max(args.concurrency), ray_actor_options={"num_cpus": 0})
    class Enhancer:
        def __init__(self) -> None:
            self.runner = build_runner(Path(weights), size, threads)
            self.runner.warm_up((1,))

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
        async def batch(self, jobs: list[Job]) -> list[JobResult]:
            return await asyncio.to_thread(self.runner.run_jobs, jobs)

        async def __call__(self, job: Job) -> JobResult:
            return await self.batch(job)

    ray.init(
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    try:
        serve.start(http_options={"location": "NoServer"})
        handle = serve.run(Enhancer.bind(), name="fundus-bench", route_prefix=None)

        async def call(job: Job) -> JobResult:
            return await handle.remote(job)

        yield call
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ main


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def by_concurrency(rows: list[dict[str, Any]] | None) -> dict[int, dict[str, Any]]:
    return {row["concurrency"]: row for row in rows or []}


def summarise(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    embedded = by_concurrency(results.get("embedded"))
    redis1 = by_concurrency(results.get("redis_1_worker"))
    redis2 = by_concurrency(results.get("redis_2_workers"))
    ray_rows = results.get("ray_serve")
    ray = by_concurrency(ray_rows if isinstance(ray_rows, list) else None)
    ratios: dict[str, Any] = {}
    for c in args.concurrency:
        entry: dict[str, Any] = {}
        pairs = [
            ("redis_1_worker", redis1, "embedded", embedded),
            ("redis_2_workers", redis2, "embedded", embedded),
        ]
        ours = (("embedded", embedded), ("redis_1_worker", redis1), ("redis_2_workers", redis2))
        pairs += [(name, rows, "ray", ray) for name, rows in ours]
        for name, rows, base_name, base in pairs:
            if c in rows and c in base:
                entry[f"{name}_vs_{base_name}_throughput"] = ratio(
                    rows[c]["throughput_per_s"], base[c]["throughput_per_s"]
                )
                entry[f"{name}_vs_{base_name}_p50"] = ratio(rows[c]["p50_ms"], base[c]["p50_ms"])
        ratios[f"c{c}"] = entry
    hop: dict[str, Any] = {}
    low = min(args.concurrency)
    if low in embedded and low in redis1:
        hop = {
            "concurrency": low,
            "p50_ms": round(redis1[low]["p50_ms"] - embedded[low]["p50_ms"], 2),
            "mean_ms": round(redis1[low]["mean_ms"] - embedded[low]["mean_ms"], 2),
        }
    return {"ratios": ratios, "redis_hop_cost_ms": hop}


async def run_all(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    targets: list[tuple[str, Callable[[], Any]]] = [
        ("embedded", lambda: embedded_target(args)),
        ("redis_1_worker", lambda: redis_target(args, 1, folder)),
        ("redis_2_workers", lambda: redis_target(args, 2, folder)),
    ]
    if not args.skip_ray:
        targets.append(("ray_serve", lambda: ray_target(args)))
    for name, factory in targets:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            async with factory() as call:
                results[name] = await sweep(call, args)
        except ImportError as exc:
            results[name] = {"unavailable": f"not installed: {exc}"}
        except Exception as exc:
            results[name] = {
                "unavailable": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=3),
            }
    if args.skip_ray:
        results["ray_serve"] = {"unavailable": "skipped (--skip-ray)"}
    return results


def collect(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Run every target in a scratch folder (weights, redis-server, worker logs); results and wall time."""
    with tempfile.TemporaryDirectory(prefix="fundus-redis-bench-") as tmp:
        folder = Path(tmp)
        args.random_weights = args.weights is None
        if args.weights is None:
            torch.manual_seed(0)
            args.weights = folder / f"{args.preset}.safetensors"
            save_artifact(args.weights, MageNet(get_preset(args.preset)), preset=args.preset)
        config = load_artifact(args.weights, "cpu").config
        args.size = args.size or int(config.working_size)
        started = time.perf_counter()
        results = asyncio.run(run_all(args, folder))
        return results, round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", type=Path, help="artifact to serve (default: random weights of --preset)"
    )
    parser.add_argument("--preset", default="tiny", help="preset for random weights (default tiny)")
    parser.add_argument("--size", type=int, help="working size (default: the preset's)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=48, help="requests per level above concurrency 1")
    parser.add_argument("--requests-c1", type=int, default=16, help="requests at concurrency 1")
    parser.add_argument("--warmup", type=int, default=8, help="discarded warm-up requests per target")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-request deadline")
    parser.add_argument(
        "--model-threads",
        type=int,
        default=1,
        help="torch threads per model process (each worker, the embedded queue, the Ray replica); "
        "more than one per core thrashes on a shared machine",
    )
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})

    # Ray and the workers write to stdout; keep it for the JSON alone by pointing fd 1 at stderr meanwhile.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        results, wall = collect(args)
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    report = {
        "machine": {
            "cpus": CORES,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "settings": {
            "weights": "random weights of preset " + args.preset
            if args.random_weights
            else str(args.weights),
            "working_size": args.size,
            "max_batch_size": args.max_batch_size,
            "max_batch_wait_ms": args.max_batch_wait_ms,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "requests_c1": args.requests_c1,
            "model_threads_per_process": args.model_threads,
            "client": "closed-loop asyncio, queue boundary (no HTTP/codecs), same jobs for every target",
        },
        "results": results,
        **summarise(results, args),
        "wall_s": wall,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
