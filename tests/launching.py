"""Helpers for tests that start real torchrun agents (importable by the tests, not by ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from ecdit_dist.launch import JobSpec, torchrun_argv, validate
from workers import EQUIV, TINY

# short, deterministic runs: every step logged, no periodic checkpoint (preemption must save by itself)
BASE = [*EQUIV, "logging.interval=1", "logging.progress=false", "logging.tensorboard=false", "sample.at_end=false",
        "checkpoint.interval=0"]


def spec(nodes: int, nproc: int, run_dir: Path, sets: list[str], kind: str = "local", max_restarts: int = 0) -> JobSpec:
    return validate(JobSpec(kind=kind, config=str(TINY), nodes=nodes, nproc_per_node=nproc, cpu=True,
                            sets=[*BASE, *sets, f"run.dir={run_dir}"], max_restarts=max_restarts))


def env() -> dict[str, str]:
    """The environment the generated jobs export (ENV_DEFAULTS), for agents started directly."""
    from ecdit_dist.launch import ENV_DEFAULTS

    return {**os.environ, **{k: v for k, (v, _) in ENV_DEFAULTS.items()}, "CUDA_VISIBLE_DEVICES": "",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}


def start_agent(job: JobSpec, port: int, log: Path, rdzv_id: str = "test") -> subprocess.Popen:
    argv = torchrun_argv(job, f"127.0.0.1:{port}", rdzv_id)
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def logged(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends; the newest line of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"{what}: a process exited early with {dead[0].returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a process started in its own session; on timeout kill its whole session and fail."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        raise AssertionError(f"process {proc.args[:3]} did not finish within {timeout}s") from None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def final_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's model weights, consolidated."""
    from safetensors.torch import load_file

    from ecdit_dist.checkpoint import convert

    convert.export(str(run_dir), str(out), max_shard_size="0")
    return load_file(Path(out) / "model.safetensors")


def assert_same_run(got_dir: Path, ref_dir: Path, steps: int, tmp: Path) -> None:
    """Per-step losses (1e-5) and final weights equal to the reference run."""
    got, ref = logged(got_dir), logged(ref_dir)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    for s in range(1, steps + 1):
        assert abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, got[s], ref[s])
    a, b = final_weights(got_dir, tmp / "got"), final_weights(ref_dir, tmp / "ref")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
