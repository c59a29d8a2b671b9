"""The peer users compare us with: the same ``/enhance`` work as a Ray Serve application.

A FastAPI ingress deployment reads the PNG upload, decodes it, finds the field of view and crops
the working image (the service's own functions), hands the job to a model deployment whose
``@serve.batch`` method runs the same :class:`service.runner.ModelRunner`, then maps the answer back
and encodes PNG, as the service does. ``bench/serve_bench.py --peer ray`` drives it over HTTP with
the same clients as ``fundus serve``. Benchmark code only (``pip install -e ".[bench]"``).

No ``from __future__ import annotations`` here: Ray pickles the deployment classes, and FastAPI must
see the route's ``Request`` annotation as the class itself, not as a name to look up later.
"""

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def ray_enhance_server(
    weights: Path,
    *,
    port: int,
    working_size: int,
    max_batch_size: int,
    max_wait_ms: float,
    torch_threads: int,
    ingress_replicas: int,
    cpus: int,
) -> Iterator[str]:
    """Start Ray Serve on 127.0.0.1:``port`` with the enhance app; yields its base URL."""
    import ray
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Model:
        def __init__(self) -> None:
            from service.runner import load_runner
            from service.settings import Settings

            settings = Settings(
                weights=weights,
                device="cpu",
                torch_threads=torch_threads,
                max_batch_size=max_batch_size,
                _env_file=None,  # type: ignore[call-arg]
            )
            self.runner, _ = load_runner(settings)
            self.runner.warm_up((1,))

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def run(self, jobs: list[Any]) -> list[Any]:
            return await asyncio.to_thread(self.runner.run_jobs, jobs)

        async def __call__(self, job: Any) -> Any:
            return await self.run(job)

    @serve.deployment(
        ray_actor_options={"num_cpus": 0}, num_replicas=ingress_replicas, max_ongoing_requests=256
    )
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model: Any) -> None:
            from service.codecs import default_registry

            self.model = model
            self.codecs = default_registry()
            self.png = self.codecs.by_format("png")

        @app.post("/enhance")
        async def enhance(self, request: Request) -> Response:
            from service.codecs import EncodeContext
            from service.imaging import decode_upload, prepare, restore_enhanced
            from service.queue.base import Job, Task
            from service.upload import Upload

            body = await request.body()
            decoded = await asyncio.to_thread(
                decode_upload, self.codecs, Upload(body, "image/png"), max_pixels=10**8, min_side=16
            )
            prepared = await asyncio.to_thread(prepare, decoded, working_size)
            job = Job(
                request_id=str(time.monotonic_ns()),
                task=Task.ENHANCE,
                pixels=prepared.model_input(),
                deadline=time.time() + 3600,
            )
            result = await self.model.remote(job)

            def finish() -> bytes:
                pixels = restore_enhanced(prepared, result.image, output_size="original", method="transfer")
                context = EncodeContext(task="enhance", model_version="ray-peer")
                return self.png.encode(pixels, original=decoded, context=context)

            return Response(content=await asyncio.to_thread(finish), media_type="image/png")

        @app.get("/readyz")
        async def ready(self) -> dict[str, str]:
            return {"status": "ready"}

    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Ingress.bind(Model.bind()), name="fundus-peer", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
