"""Cofe-Net degradation speed: milliseconds per 512² image for batch sizes 1 and 8, printed as JSON.

All three degradation types are applied to every image (the most expensive case), on a synthetic
fundus-like disk. Usage: ``python bench/degrade_bench.py [--device cpu|cuda] [--threads N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.degradation import ALL_TYPES, degrade


def synthetic_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (0.47 * size) ** 2).float()
    colour = torch.tensor([0.7, 0.35, 0.15]).view(1, 3, 1, 1)
    images = (
        colour + 0.1 * torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    ) * disk
    return images.clamp(0, 1).to(device), disk.expand(batch, 1, size, size).contiguous().to(device)


def time_batch(batch: int, size: int, device: torch.device, repeats: int, mode: str) -> float:
    images, fov = synthetic_batch(batch, size, device)
    generator = torch.Generator().manual_seed(0)
    degrade(images, fov, generator=generator, types=ALL_TYPES, mode=mode)  # warm-up
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        degrade(images, fov, generator=generator, types=ALL_TYPES, mode=mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return 1000 * sorted(timings)[len(timings) // 2] / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "size": args.size,
        "types": list(ALL_TYPES),
        "ms_per_image": {
            mode: {
                f"batch_{b}": round(time_batch(b, args.size, device, args.repeats, mode), 2) for b in (1, 8)
            }
            for mode in ("cofe", "paper")
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
