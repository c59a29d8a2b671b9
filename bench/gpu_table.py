"""The Markdown table of ``bench/gpu_bench.sh`` from the JSON each ``serve_bench.py`` run left.

Usage: ``python bench/gpu_table.py OUT_DIR PRESET...`` where OUT_DIR holds ``<preset>.json`` (and,
on a GPU, ``utilisation.csv`` sampled by nvidia-smi with ``<preset>.start`` / ``.end`` times).
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


def utilisation(folder: Path, preset: str) -> float | None:
    """Mean GPU utilisation (%) sampled between the preset run's start and end, if sampled."""
    samples = folder / "utilisation.csv"
    start, end = folder / f"{preset}.start", folder / f"{preset}.end"
    if not (samples.is_file() and start.is_file() and end.is_file()):
        return None
    low, high = float(start.read_text()), float(end.read_text())
    values = []
    for line in samples.read_text().splitlines():
        stamp, _, value = line.partition(",")
        try:
            moment = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            if low <= moment <= high:
                values.append(float(value))
        except ValueError:
            continue
    return statistics.fmean(values) if values else None


def row(preset: str, result: dict[str, Any], busy: float | None) -> str:
    bare = result["bare"]
    levels = sorted(result["service"], key=int)
    low, high = result["service"][levels[0]], result["service"][levels[-1]]
    ratio = high["images_per_s"] / bare["images_per_s"]
    return (
        f"| `{preset}` | {bare['images_per_s']:.1f} img/s (batch-1 {bare['batch1_model_ms_p50']:.1f} ms) "
        f"| {low['images_per_s']:.1f} img/s, p50 {low['latency_ms_p50']:.0f} ms "
        f"| {high['images_per_s']:.1f} img/s, p50 {high['latency_ms_p50']:.0f} ms | {ratio:.2f} "
        f"| {'n/a' if busy is None else f'{busy:.0f} %'} |"
    )


def main(argv: list[str]) -> int:
    folder, presets = Path(argv[0]), argv[1:]
    results = {p: json.loads((folder / f"{p}.json").read_text()) for p in presets}
    first = next(iter(results.values()))
    levels = sorted(first["service"], key=int)
    gpu = (folder / "gpu.txt").read_text().strip() if (folder / "gpu.txt").is_file() else first["device"]
    print(f"\n{gpu}; batches up to {first['max_batch_size']}; 512² PNG; {datetime.now():%Y-%m-%d}\n")
    print(
        f"| preset | bare model, batch {first['max_batch_size']} | service c={levels[0]} "
        f"| service c={levels[-1]} | service / bare | GPU busy |"
    )
    print("|---|---|---|---|---|---|")
    for preset, result in results.items():
        print(row(preset, result, utilisation(folder, preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
