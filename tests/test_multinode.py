"""Multi-node jobs for real: a Slurm cluster on this machine (slurmctld + two slurmd) and two
hosts made of network namespaces. Every run is compared with one 4-rank torchrun on one node.

The Slurm tests need Debian's slurm-wlm and munge (CI installs them, see .ci/run); the
namespace test needs root. Elsewhere they skip and say why; in CI (CI set) they fail instead.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ecdit_dist.checkpoint.manager import CheckpointManager
from ecdit_dist.cli import main as ecdit
from ecdit_dist.parallel.local import free_port
from launching import BASE, assert_same_run, finish, logged, spec, start_agent, wait_for
from slurm_cluster import SlurmCluster, ensure_hosts, missing_binaries
from workers import TINY

pytestmark = pytest.mark.slow

STEPS = 8
LAYOUT = ["parallel.tp=2", "parallel.ep=2", f"train.steps={STEPS}"]
TIMEOUT = 900


def need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run this test)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tp2 x ep2 on one node: one torchrun agent with 4 ranks."""
    root = tmp_path_factory.mktemp("reference")
    proc = start_agent(spec(1, 4, root / "run", LAYOUT), free_port(), root / "agent.log")
    assert finish(proc, TIMEOUT) == 0, (root / "agent.log").read_text()[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need(not missing_binaries(), f"Slurm/munge binaries missing: {missing_binaries()} (apt-get install slurm-wlm munge)")
    need(os.geteuid() == 0, "the test Slurm cluster runs its daemons as root")
    ensure_hosts()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def write_sbatch(tmp_path: Path, run: Path) -> Path:
    job = tmp_path / "job.sbatch"
    code = ecdit(["launch", "slurm", "--config", str(TINY), "--nodes", "2", "--nproc-per-node", "2", "--cpu",
                  "--set", *BASE, *LAYOUT, f"run.dir={run}", "--out", str(job)])
    assert code == 0 and (run / "logs").is_dir()
    return job


def wait_state(cluster, job: str, states: set[str], timeout: float = TIMEOUT) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job_state(job)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} - states:
            raise AssertionError(f"job {job} ended {info.get('JobState')}: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout}s\n{cluster.logs()}")
        time.sleep(1)


def job_logs(run: Path) -> str:
    """Every log of the job, whole (an agent's shutdown traceback can push a rank's line far up)."""
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted((run / "logs").glob("*")))


@pytest.mark.timeout(1800)
def test_sbatch_script_trains_like_one_node(cluster, reference, tmp_path):
    """`ecdit launch slurm --run` submits exactly what --dry-run prints; 2 nodes x 2 ranks on Slurm
    train tp2 x ep2 with the per-step losses of one 4-rank node."""
    import sys

    run = tmp_path / "run"
    args = [sys.executable, "-m", "ecdit_dist.cli", "launch", "slurm", "--config", str(TINY), "--nodes", "2",
            "--nproc-per-node", "2", "--cpu", "--set", *BASE, *LAYOUT, f"run.dir={run}"]
    dry = subprocess.run([*args, "--dry-run"], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and not run.exists(), dry.stderr
    sub = subprocess.run([*args, "--out", str(tmp_path / "job.sbatch"), "--run"], env=cluster.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0 and "Submitted batch job" in sub.stdout, sub.stdout + sub.stderr
    job = sub.stdout.split()[-1]
    submitted = cluster.run("scontrol", "write", "batch_script", job, "-").stdout
    assert submitted == dry.stdout
    info = wait_state(cluster, job, {"COMPLETED"})
    logs = job_logs(run)
    assert info["NumNodes"] == "2", info
    node_logs = sorted(p.name for p in (run / "logs").glob(f"*-{job}-node*.log"))
    assert node_logs == [f"ecdit-{job}-node0.log", f"ecdit-{job}-node1.log"], (node_logs, logs)
    assert "rendezvous nodeA:" in logs
    got, ref = logged(run), logged(reference)
    assert sorted(got) == list(range(1, STEPS + 1)), logs
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, got[s], ref[s])


@pytest.mark.timeout(1800)
def test_requeue_saves_the_reached_step_and_the_job_resumes(cluster, reference, tmp_path):
    """`scontrol requeue` mid-run with checkpoint.interval=0: SIGTERM to every process, every rank
    saves the step it reached, Slurm restarts the job, it resumes and ends like an uninterrupted run."""
    run = tmp_path / "run"
    job = cluster.run("sbatch", "--parsable", str(write_sbatch(tmp_path, run)), cwd=tmp_path).stdout.strip()
    wait_for(lambda: len(logged(run)) >= 2, TIMEOUT, "two steps on Slurm")
    cluster.run("scontrol", "requeue", job)
    # the requeued job waits for its begin time (about 2 minutes); the first run saves within KillWait
    wait_for(lambda: "preempted: saved step" in job_logs(run), 120, "the requeued job's checkpoint")
    wait_state(cluster, job, {"PENDING"}, timeout=120)
    saved = sorted(CheckpointManager(run).committed_steps())
    reached = max(logged(run))
    assert saved == [reached] and reached < STEPS, (saved, reached, job_logs(run))
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")   # skip the wait
    info = wait_state(cluster, job, {"COMPLETED"})
    assert info["Restarts"] == "1", info
    logs = job_logs(run)
    assert f"preempted: saved step {reached}" in logs and f"at step {reached}" in logs, logs[-6000:]
    assert f"job {job} restart 1" in logs
    assert_same_run(run, reference, STEPS, tmp_path)


# ---------------------------------------------------------------- two hosts by network namespaces
NETNS = {"198.51.100.1": ("ecdit-ns-a", "ecdit-va"), "198.51.100.2": ("ecdit-ns-b", "ecdit-vb")}


@pytest.fixture
def two_hosts():
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "network namespaces need root and iproute2")
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=30)   # noqa: E731
    for addr, (ns, _) in NETNS.items():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)   # a leftover of a killed run
    try:
        (a_ns, a_if), (b_ns, b_if) = NETNS.values()
        sh("ip", "netns", "add", a_ns)
        sh("ip", "netns", "add", b_ns)
        sh("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if)
        for addr, (ns, dev) in NETNS.items():
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield NETNS
    finally:
        for ns, _ in NETNS.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.timeout(1800)
def test_hostfile_job_across_two_network_namespaces(two_hosts, reference, tmp_path):
    """Two 'hosts' joined by a veth pair; the hostfile script starts one agent in each (its ssh step
    replaced by `ip netns exec`); they meet at the first host's rendezvous; 2 x 2 ranks train like one node."""
    run = tmp_path / "run"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{addr} slots=2\n" for addr in two_hosts))
    rsh = tmp_path / "rsh"
    cases = "".join(f"  {addr}) ns={ns}; dev={dev} ;;\n" for addr, (ns, dev) in two_hosts.items())
    rsh.write_text(f'#!/bin/bash\n# rsh HOST COMMAND: run COMMAND "on" HOST, i.e. in its namespace\ncase "$1" in\n{cases}'
                   '  *) echo "unknown host $1" >&2; exit 2 ;;\nesac\n'
                   'exec ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$dev" bash -c "$2"\n')
    rsh.chmod(0o755)
    script = tmp_path / "job.sh"
    assert ecdit(["launch", "hostfile", "--hostfile", str(hostfile), "--config", str(TINY), "--nodes", "2",
                  "--nproc-per-node", "2", "--cpu", "--max-restarts", "0",
                  "--set", *BASE, *LAYOUT, f"run.dir={run}", "--out", str(script)]) == 0
    env = {**os.environ, "ECDIT_RSH": str(rsh), "OMP_NUM_THREADS": "1", "RDZV_PORT": str(free_port())}
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"hostfile job did not finish\n{job_logs(run)}") from None
    assert proc.returncode == 0, out + job_logs(run)
    logs = job_logs(run)
    assert "rendezvous 198.51.100.1:" in out
    got, ref = logged(run), logged(reference)
    assert sorted(got) == list(range(1, STEPS + 1)), logs
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, got[s], ref[s])
