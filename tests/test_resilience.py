"""Fault injection: non-finite steps, tampered checkpoints, full disks, failing ranks, a stopped
mirror, changed configs on resume, interrupted exports. Every fault is real where it can be
(a NaN in a gradient, a tmpfs that fills up, a server that is stopped)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecdit_dist.checkpoint.manager import CheckpointManager
from ecdit_dist.checkpoint.tensors import DCPSource
from ecdit_dist.metrics import read_metrics
from ecdit_dist.parallel.local import run_ranks
from workers import QUIET, TINY, nonfinite_guard

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "ecdit_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- non-finite guard
def test_divergent_lr_never_writes_a_nonfinite_checkpoint_and_stops(tmp_path):
    run = tmp_path / "run"
    out = cli("train", "--config", TINY, "--set", *QUIET, f"run.dir={run}", "optim.lr=1e6", "optim.warmup_steps=0",
              "train.steps=12", "train.global_batch_size=8", "checkpoint.interval=1", "checkpoint.keep_last=1",
              "train.nonfinite_patience=3", "logging.interval=1")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "consecutive steps with a non-finite loss or gradient" in out.stderr and "Traceback" not in out.stderr
    records = read_metrics(run)
    skipped = [r["nonfinite/skipped_steps"] for r in records]
    assert skipped[-1] == 2 and skipped == sorted(skipped)          # the third skip stops before it is logged
    steps = CheckpointManager(run).committed_steps()
    assert steps, "no checkpoint at all"
    for step in steps:                                             # every checkpoint holds finite weights
        src = DCPSource(run / "checkpoints" / f"step-{step:08d}")
        for name in src.infos:
            assert torch.isfinite(src.load(name)).all(), (step, name)
    healthy = [s for s in steps if json.loads((run / "checkpoints" / f"step-{s:08d}" / "meta.json").read_text())
               ["healthy"]]
    first_bad = next(r["step"] for r in records if r["loss"] is None or not math.isfinite(r["loss"]))
    assert healthy and max(healthy) == first_bad - 1                # the last good one survives keep_last=1


def test_nan_gradient_on_one_of_four_ranks_is_skipped_everywhere(tmp_path):
    steps, bad = 4, 1
    results = run_ranks(nonfinite_guard, 4, tmp_path / "ranks", str(tmp_path), ["parallel.tp=2", "parallel.ep=2"],
                        steps, bad, timeout=600)
    r0 = results[0]
    records = {r["step"]: r for r in r0["records"]}
    assert [records[s]["nonfinite/skipped_steps"] for s in range(1, steps + 1)] == [0, 1, 1, 1]
    for step, loss in r0["ref_losses"].items():                    # every applied step equals the reference
        assert records[step]["loss"] == loss, step
    assert all(r["same_params"] and r["same_ema"] for r in results)
    poisoned = results[1]["poisoned"][0]
    for r in results:                                              # the same error on every rank
        assert r["stop_error"] is not None and r["stop_error"].startswith(f"step {bad}:")
        assert f"{poisoned} (gradient) on rank 1" in r["stop_error"]
