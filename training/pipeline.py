"""``fundus train all``: the whole recipe from one config, resumable, inside one time budget.

Phases in order: vessel branch (``rsp``) → pseudo-masks → independent evaluation segmenter →
mean-teacher enhancement → ``fundus eval`` at both resolutions (with the faults outside the training
family) → the model-card tables. Each phase whose product already exists is skipped, and one that
stopped early is resumed from its checkpoint, so the same command continues an interrupted run.
``max_minutes`` is shared by all phases: each training phase gets what is left, and the run stops
cleanly (with checkpoints) when it is spent.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint import CHECKPOINT_NAME
from training.config import TrainConfig
from training.model_card import write_tables
from training.sources import build_split

log = logging.getLogger("training")

#: Minutes kept back for evaluation and the report when a budget is given.
EVAL_RESERVE_MIN = 1.0

TrainPhase = Callable[..., dict[str, Any]]


def _run_phase(
    config: TrainConfig, phase: str, product: str, train: TrainPhase, minutes_left: float
) -> dict[str, Any]:
    """Skip a finished phase, resume an interrupted one, or start it."""
    folder = config.phase_dir(phase)
    if (folder / product).is_file():
        log.info("%s: done already (%s)", phase, folder / product)
        return {"phase": phase, "finished": True, "skipped": True, "weights": str(folder / product)}
    resume = str(folder) if (folder / CHECKPOINT_NAME).is_file() else None
    log.info("%s: %s", phase, "resuming" if resume else "starting")
    if resume:
        return train(config, resume=resume, max_minutes=minutes_left)
    return train(config, max_minutes=minutes_left)


def run_all(
    config: TrainConfig,
    *,
    max_minutes: float = 0.0,
    data: str | None = None,
    eval_limit: int = 0,
    native_max_side: int = 0,
) -> dict[str, Any]:
    """Run every phase of ``config`` (see the module docstring); returns the summary (also saved
    as ``<run>/pipeline.json``). ``eval_limit`` / ``native_max_side`` are passed to the evaluation
    (0 = the whole test split at the photographs' own size)."""
    from training.evaluate import evaluate
    from training.phase_enhance import train_enhance
    from training.phase_pseudo import make_pseudo_masks
    from training.phase_rsp import train_rsp
    from training.phase_segmenter import train_segmenter

    started = time.monotonic()

    def left() -> float:
        if max_minutes <= 0:
            return 0.0  # no limit
        return max(max_minutes - EVAL_RESERVE_MIN - (time.monotonic() - started) / 60.0, 0.01)

    run_folder = Path(config.run.out_root) / config.run.name
    summary: dict[str, Any] = {"run": str(run_folder), "phases": {}}
    phases = summary["phases"]

    def record(name: str, result: dict[str, Any]) -> bool:
        phases[name] = {k: v for k, v in result.items() if k != "validation"} | {
            "validation": result.get("validation")
        }
        return bool(result.get("finished"))

    done = record("rsp", _run_phase(config, "rsp", "rsp.safetensors", train_rsp, left()))
    if done:
        pseudo = config.phase_dir("pseudo-masks") / "summary.json"
        result = json.loads(pseudo.read_text()) if pseudo.is_file() else make_pseudo_masks(config)
        record("pseudo-masks", {**result, "finished": True})
        done = record(
            "segmenter", _run_phase(config, "segmenter", "segmenter.safetensors", train_segmenter, left())
        )
    if done:
        done = record("enhance", _run_phase(config, "enhance", "teacher.safetensors", train_enhance, left()))
    summary["finished"] = done
    if done:
        out = config.phase_dir("eval")
        report = evaluate(
            config.phase_dir("enhance") / "teacher.safetensors",
            data or config.data.root,
            out,
            size=config.data.working_size,
            device=config.run.device,
            mode=config.enhance.degradation_mode,
            resolution="both",
            limit=eval_limit,
            native_max_side=native_max_side,
            segmenter=config.phase_dir("segmenter") / "segmenter.safetensors",
            # Do no harm across every camera trained on: the run's held-out good photographs.
            good_photos=[r.image for r in build_split(config.data).held_out_clean(config.data)],
            other_degradations=True,
        )
        summary["eval"] = {"report": str(out / "report.json"), "summary": report["summary"]}
        summary["model_card_tables"] = str(write_tables(report, out / "model-card-tables.md"))
    summary["wall_time_s"] = round(time.monotonic() - started, 1)
    run_folder.mkdir(parents=True, exist_ok=True)
    (run_folder / "pipeline.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
