"""Run a function on N local ranks in spawned processes (tests, benchmarks), with a free port
and a hard timeout.

A rank that raises writes its traceback next to the results; a hang kills every rank and
fails the test instead of eating the CI budget.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


def run_ranks(fn: Callable, world: int, out_dir: Path, *args: Any, timeout: float = 300) -> list[Any]:
    """Start `world` processes running fn(rank, world, *args); return their results in rank order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out_dir), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: (out_dir / f"rank{r}.err").read_text() for r in range(world) if (out_dir / f"rank{r}.err").exists()}
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s; errors: {errors}")
    if errors or any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"ranks failed (exit codes {[p.exitcode for p in procs]}): {errors}")
    results = []
    for r in range(world):
        with open(out_dir / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
