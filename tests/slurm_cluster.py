"""A throw-away Slurm cluster on this machine: munged, slurmctld and two slurmd (nodeA, nodeB)
sharing 127.0.0.1 on distinct ports, every file under one folder, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ecdit_dist.parallel.local import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
NODES = ("nodeA", "nodeB")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_hosts() -> None:
    """The node names must resolve (srun and the rendezvous use them)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    names = {n for line in text.splitlines() for n in line.split("#", 1)[0].split()[1:]}
    if not set(NODES) <= names:
        with open(hosts, "a") as f:
            f.write(f"\n127.0.0.1 {' '.join(NODES)}\n")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.pids: list[int] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.cpus = cpus

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool-nodeA", "spool-nodeB", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        subprocess.run([_bin("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munged.seed'}"], check=True, timeout=60)
        self._wait_file(r / "munge" / "munged.pid")
        self.pids.append(int((r / "munge" / "munged.pid").read_text()))
        ctld, ports = free_port(), {n: free_port() for n in NODES}
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[n]} "
                          f"CPUs={self.cpus} State=UNKNOWN" for n in NODES)
        self.conf.write_text(f"""\
ClusterName=ecdittest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/linear
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# the grace between SIGTERM and SIGKILL (scancel, requeue, preemption): one step + one checkpoint
KillWait=30
# restart requeued jobs as soon as they are eligible
SchedulerParameters=defer_batch
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        self._daemon([_bin("slurmctld"), "-f", str(self.conf), "-i"], r / "slurmctld.pid")
        for n in NODES:
            self._daemon([_bin("slurmd"), "-f", str(self.conf), "-N", n], r / f"slurmd-{n}.pid")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").startswith("idle") for n in NODES):
                return self
            time.sleep(1)
        raise RuntimeError(f"Slurm nodes did not become idle: {out!r}\n{self.logs()}")

    def _daemon(self, argv: list[str], pidfile: Path) -> None:
        subprocess.run(argv, check=True, env=self.env, timeout=60)
        self._wait_file(pidfile)
        self.pids.append(int(pidfile.read_text()))

    @staticmethod
    def _wait_file(path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not appear")
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=check, cwd=cwd)

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job, "-o").stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    @staticmethod
    def _is_daemon(pid: int) -> bool:
        """The pid still names one of our daemons: a daemon that already exited may have left its
        pid to an unrelated process (another test's rank), which must never get our signals."""
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return False
        return name in ("munged", "slurmctld", "slurmd")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            if self._is_daemon(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for pid in self.pids:
            while time.monotonic() < deadline and self._is_daemon(pid):
                time.sleep(0.2)
            if self._is_daemon(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
