"""Code that runs inside spawned ranks for tests/test_profiling.py."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "sample.at_end=false", "checkpoint.interval=0",
         "train.global_batch_size=16", "logging.interval=1", "optim.ema_decay=0"]


def timers_on_off(rank: int, world: int, base: str, overrides: list[str]) -> dict:
    """Two steps with timers and a trace of step 2, one more step timed by the wall clock too;
    then the same two steps with timers off. Returns what the test compares."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    common = [*QUIET, "train.steps=2", *overrides]
    on = Trainer(load_config(TINY, [*common, f"run.dir={base}/on", "logging.timers=true",
                                    "profiling.trace_steps=[2,2]"]))
    on.fit()
    t0 = time.perf_counter()
    on.profiler.begin(2)
    on.train_step(2)
    on.profiler.end(2)
    wall = time.perf_counter() - t0
    timed = on.profiler.metrics()
    off = Trainer(load_config(TINY, [*common, f"run.dir={base}/off"]))
    off.fit()
    off.close()
    return {"timed": timed, "wall": wall}
