"""Two-process DDP (gloo, CPU): ranks read disjoint data, keep identical students and teachers,
and only rank 0 writes the checkpoint."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.training.helpers import tiny_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, tmp: str, data_root: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from training.loop import LoopOptions, run_loop
    from training.phase_enhance import EnhanceTask
    from training.runtime import RunLogger, shutdown_distributed
    from training.session import open_session

    config = tiny_config(Path(tmp), Path(data_root), ["enhance.loss.use_rsp=false", "run.device=cpu"])
    session = open_session(config, "enhance", run_dir=str(Path(tmp) / "ddp"))
    try:
        task = EnhanceTask(session)
        logger = RunLogger(session.run_dir, [], enabled=False, tensorboard=False)
        seen = [[*b[0]["corner"].tolist(), b[0]["image"].float().mean().item()] for b in task.batches(0)]
        run_loop(
            task,
            task.batches,
            run_dir=session.run_dir,
            env=session.env,
            device=session.device,
            logger=logger,
            options=LoopOptions(total_steps=3, log_every=0, val_every=0, checkpoint_every=0, progress=False),
            extra_state=lambda: {"phase": "enhance"},
        )
        lines = [_digest(task.student.state_dict()), _digest(task.teacher.state_dict()), repr(seen)]
        (Path(tmp) / f"rank{rank}.txt").write_text("\n".join(lines))
    finally:
        shutdown_distributed()


def test_two_ranks_keep_identical_teachers(tmp_path: Path, data_root: Path) -> None:
    mp.start_processes(
        _worker, args=(str(tmp_path), str(data_root), _free_port()), nprocs=2, join=True, start_method="spawn"
    )
    a, b = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2))
    assert a[0] == b[0]  # DDP-averaged gradients keep the students equal
    assert a[1] == b[1]  # the EMA teacher is updated identically on every rank
    assert a[2] != b[2]  # each rank reads its own shard
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()
