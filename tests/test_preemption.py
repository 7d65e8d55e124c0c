"""Preemption under a real torchrun agent (2 ranks, ep2, CPU/gloo): real signals, real kills.

Every test compares with one uninterrupted run of the same command: per-step losses and the
final weights must be the same after the run was stopped and started again.
"""

import os
import signal
import time
from pathlib import Path

import pytest

from ecdit_dist.checkpoint.manager import CheckpointManager, step_dir_name, verify_checkpoint
from ecdit_dist.parallel.local import free_port
from ecdit_dist.preemption import EXIT_PREEMPTED, REPEAT_WINDOW_S
from launching import assert_same_run, descendants, finish, logged, spec, start_agent, wait_for

pytestmark = pytest.mark.slow

STEPS = 10
LAYOUT = ["parallel.ep=2", f"train.steps={STEPS}"]
TIMEOUT = 600      # a whole run on a loaded machine; a hang fails instead of eating the CI budget


def committed(run: Path) -> list[int]:
    return sorted(CheckpointManager(run).committed_steps())


def run_to_end(run: Path, log: Path, sets=LAYOUT) -> str:
    proc = start_agent(spec(1, 2, run, sets), free_port(), log)
    rc = finish(proc, TIMEOUT)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


def workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under a torchrun agent."""
    out = {}
    for pid in descendants(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ecdit_dist.train" in cmd:
            for item in env:
                if item.startswith(b"RANK="):
                    out[int(item[5:])] = pid
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    run_to_end(root / "run", root / "agent.log")
    return root / "run"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["SIGTERM-to-agent", "SIGTERM-to-every-process", "SIGUSR1-to-every-process"])
def test_signal_saves_the_reached_step_and_a_rerun_finishes_identically(mode, reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "agent.log"
    agent = start_agent(spec(1, 2, run, LAYOUT), free_port(), log)
    wait_for(lambda: len(logged(run)) >= 2 and len(workers(agent.pid)) == 2, TIMEOUT, "two steps", [agent])
    sig = signal.SIGUSR1 if mode.startswith("SIGUSR1") else signal.SIGTERM
    targets = [agent.pid] if mode.endswith("agent") else [agent.pid, *workers(agent.pid).values()]
    t0 = time.monotonic()
    for pid in targets:            # the agent first, as a cgroup kill reaches it no later than the workers
        os.kill(pid, sig)
    rc = finish(agent, 120)
    took = time.monotonic() - t0
    text = log.read_text()
    reached = max(logged(run))
    print(f"{mode}: stopped at step {reached} of {STEPS}, exited {took:.1f}s after the signal (agent rc {rc})")
    assert 2 <= reached < STEPS, text[-3000:]
    assert rc != 0                                          # an interrupted job never looks finished
    assert committed(run) == [reached], (committed(run), text[-3000:])   # checkpoint.interval=0: saved for the signal
    verify_checkpoint(run / "checkpoints" / step_dir_name(reached))
    assert f"preempted: saved step {reached}" in text
    for rank in (0, 1):
        assert f"rank {rank}: got {sig.name}" in text
    assert "exiting now" not in text               # the forwarded duplicate did not count as a second signal
    assert took < 60, f"took {took:.1f}s to stop"

    again = run_to_end(run, tmp_path / "again.log")
    assert f"at step {reached}" in again
    assert_same_run(run, reference, STEPS, tmp_path)


def test_second_signal_exits_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    """Rank 1 stalls (SIGSTOP), so rank 0 waits in a collective and cannot reach a step boundary:
    the first SIGTERM is noted, the second (after the repeat window) ends it at once."""
    run, log = tmp_path / "run", tmp_path / "agent.log"
    sets = ["parallel.ep=2", "train.steps=200", "checkpoint.interval=2", "parallel.timeout_s=300"]
    agent = start_agent(spec(1, 2, run, sets), free_port(), log)
    try:
        wait_for(lambda: committed(run) and len(workers(agent.pid)) == 2, TIMEOUT, "a checkpoint", [agent])
        ranks = workers(agent.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        before = committed(run)
        os.kill(ranks[0], signal.SIGTERM)
        wait_for(lambda: "rank 0: got SIGTERM;" in log.read_text(), 60, "the first signal noted")
        time.sleep(REPEAT_WINDOW_S + 1)
        assert alive(ranks[0])                     # still waiting for the stalled peer
        os.kill(ranks[0], signal.SIGTERM)
        wait_for(lambda: not alive(ranks[0]), 60, "rank 0 exits after the second signal")
        assert "rank 0: got SIGTERM again; exiting now" in log.read_text()
        after = committed(run)
        assert after[-1] == before[-1] or after[-1] == before[-1] + 2    # a save rank 1 finished before stopping
        verify_checkpoint(run / "checkpoints" / step_dir_name(after[-1]))
    finally:
        for pid in workers(agent.pid).values():
            os.kill(pid, signal.SIGCONT)
    rc = finish(agent, 180)
    assert rc != 0
    assert f"exitcode  : {128 + signal.SIGTERM}" in log.read_text()   # torchrun's failure summary


@pytest.mark.timeout(1800)
def test_killed_worker_restarts_from_the_newest_checkpoint(reference, tmp_path):
    """SIGKILL one rank mid-run: torchrun (--max-restarts 1) restarts both, they resume, the end is the same."""
    run, log = tmp_path / "run", tmp_path / "agent.log"
    agent = start_agent(spec(1, 2, run, [*LAYOUT, "checkpoint.interval=3"], max_restarts=1), free_port(), log)
    wait_for(lambda: committed(run) and len(workers(agent.pid)) == 2, TIMEOUT, "a checkpoint", [agent])
    os.kill(workers(agent.pid)[1], signal.SIGKILL)
    rc = finish(agent, TIMEOUT)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "failed (exitcode: -9)" in text and "resumed from" in text, text[-3000:]   # killed, restarted, resumed
    assert_same_run(run, reference, STEPS, tmp_path)


def test_signal_during_startup_keeps_the_checkpoint_and_exits_preempted(tmp_path):
    """One process, no torchrun: SIGTERM before the first step of a resumed run. The resumed
    checkpoint stays, the next step is saved, the exit status is EXIT_PREEMPTED (75)."""
    import subprocess
    import sys

    from launching import BASE, env
    from workers import TINY

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ecdit_dist.train", "--config", str(TINY), "--set", *BASE, f"run.dir={run}"]
    first = subprocess.run([*cmd, "train.steps=2"], env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert first.returncode == 0 and committed(run) == [2], first.stderr[-2000:]
    log = tmp_path / "second.log"
    proc = subprocess.Popen([*cmd, "train.steps=50"], env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(lambda: "layout:" in log.read_text(), TIMEOUT, "start-up", [proc])   # before the resume and step 3
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, 120) == EXIT_PREEMPTED, log.read_text()[-2000:]
    reached = max(logged(run))
    assert 3 <= reached < 50 and committed(run) == [2, reached]
    verify_checkpoint(run / "checkpoints" / step_dir_name(2))
    assert "resumed from" in log.read_text()
