"""`ecdit launch`: write (and optionally start) the job that runs one torchrun agent per node.

Every form (Slurm, hostfile, Kubernetes, local) runs the same per-node command built by
`torchrun_argv`: c10d rendezvous on the first node, a job-unique rendezvous id, elastic
restarts, SIGUSR1 forwarded to the workers, then `-m ecdit_dist.train --config ... --set ...`.
The layout is validated (`ParallelDims.from_config`) for nodes x nproc-per-node before
anything is written or started.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ecdit_dist.config import ConfigError, load_config
from ecdit_dist.parallel.dims import ParallelDims

KINDS = ("slurm", "hostfile", "k8s", "local")
RDZV_PORT = 29500
# torchrun forwards these to the workers (SIGUSR1 is not in its default list)
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# name -> (default, what it is for). Written into every script as `export NAME=${NAME:-default}`.
ENV_DEFAULTS: dict[str, tuple[str, str]] = {
    "OMP_NUM_THREADS": ("1", "CPU threads per rank for intra-op work (torchrun's own default)"),
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": ("1", "a failed or timed-out NCCL collective aborts the rank instead of hanging"),
    "TORCH_NCCL_DUMP_ON_TIMEOUT": ("1", "on a collective timeout, dump the flight recorder"),
    "TORCH_FR_BUFFER_SIZE": ("2000", "flight recorder: keep the last N collectives per rank (0 turns it off)"),
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": ("600", "the watchdog kills a rank whose NCCL work is stuck this long"),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ("1", "ranks get a fresh store per restart attempt; sharing torchrun's "
                                                "rendezvous store can hand a restarted group stale addresses"),
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": ("120", "torchrun: seconds between forwarding SIGTERM and SIGKILL to workers; "
                                              "must cover one step + one checkpoint write"),
}


class LaunchError(ConfigError):
    """The job cannot be generated as asked."""


@dataclass
class JobSpec:
    kind: str
    config: str
    nodes: int
    nproc_per_node: int
    cpu: bool = False
    sets: list[str] = field(default_factory=list)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "ecdit"
    max_restarts: int = 1
    port: int = RDZV_PORT
    hosts: list[str] = field(default_factory=list)      # hostfile: from the hostfile; local: filled in
    image: str | None = None                             # k8s
    signal_lead_s: int = 300                             # slurm: SIGUSR1 this long before the time limit
    run_dir: str = ""                                    # from the config, for logs

    @property
    def world(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def train_sets(self) -> list[str]:
        """The --set overrides the ranks get (with --cpu, the gloo backend)."""
        return [*self.sets, "parallel.backend=gloo"] if self.cpu else list(self.sets)


def validate(spec: JobSpec) -> JobSpec:
    """Check everything a job needs before it exists: the config, the layout for this world size,
    the options of its kind. Raises LaunchError / ConfigError naming the fix."""
    if spec.kind not in KINDS:
        raise LaunchError(f"unknown launch kind {spec.kind!r}; choose one of {', '.join(KINDS)}")
    if spec.nodes < 1 or spec.nproc_per_node < 1:
        raise LaunchError(f"--nodes ({spec.nodes}) and --nproc-per-node ({spec.nproc_per_node}) must be >= 1")
    cfg = load_config(spec.config, spec.train_sets)
    try:
        ParallelDims.from_config(cfg, spec.world, "cpu" if spec.cpu else "cuda")
    except ConfigError as e:
        raise LaunchError(f"--nodes {spec.nodes} x --nproc-per-node {spec.nproc_per_node} = world size {spec.world} "
                          f"does not fit the layout: {e}") from None
    spec.run_dir = cfg.run.dir
    if spec.kind == "hostfile":
        if len(spec.hosts) != spec.nodes:
            raise LaunchError(f"the hostfile names {len(spec.hosts)} hosts but --nodes is {spec.nodes}")
    if spec.kind == "k8s" and not spec.image:
        raise LaunchError("k8s needs --image IMAGE (an image built from docker/Dockerfile)")
    if spec.time is not None and not _valid_time(spec.time):
        raise LaunchError(f"--time {spec.time!r} is not D-HH:MM:SS, HH:MM:SS or MM:SS")
    return spec


def _valid_time(t: str) -> bool:
    days, _, hms = t.rpartition("-")
    parts = hms.split(":")
    return (not days or days.isdigit()) and 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile: one `host slots=N` per line, `#` comments, blank lines ignored."""
    hosts: list[tuple[str, int]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        slots = None
        for f in fields[1:]:
            if f.startswith("slots="):
                slots = f[len("slots="):]
        if len(fields) != 2 or slots is None or not slots.isdigit() or int(slots) < 1:
            raise LaunchError(f"{path}:{n}: expected `HOST slots=N`, got {line!r}")
        if any(h == fields[0] for h, _ in hosts):
            raise LaunchError(f"{path}:{n}: host {fields[0]} is listed twice")
        hosts.append((fields[0], int(slots)))
    if not hosts:
        raise LaunchError(f"{path} names no hosts")
    return hosts


def torchrun_argv(spec: JobSpec, endpoint: str, rdzv_id: str, local_addr: str | None = None) -> list[str]:
    """The per-node command. `endpoint` and `rdzv_id` may be shell expressions the script expands."""
    argv = ["torchrun", f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={spec.max_restarts}", f"--signals-to-handle={FORWARDED_SIGNALS}"]
    if local_addr:
        argv.append(f"--local-addr={local_addr}")
    argv += ["-m", "ecdit_dist.train", "--config", spec.config]
    if spec.train_sets:
        argv += ["--set", *spec.train_sets]
    return argv


def env_lines(spec: JobSpec) -> list[str]:
    """`export` lines with overridable defaults, each with what it is for."""
    lines = []
    for name, (default, why) in ENV_DEFAULTS.items():
        lines.append(f"# {why}")
        lines.append(f"export {name}=${{{name}:-{default}}}")
    if spec.cpu:
        lines.append("# --cpu: no GPUs, gloo backend")
        lines.append('export CUDA_VISIBLE_DEVICES=""')
    return lines


def command_line(spec: JobSpec) -> str:
    """The `ecdit launch` command that writes this job (recorded in its header)."""
    parts = ["ecdit", "launch", spec.kind, "--config", spec.config, "--nodes", str(spec.nodes),
             "--nproc-per-node", str(spec.nproc_per_node)]
    if spec.cpu:
        parts.append("--cpu")
    for opt, value in (("--partition", spec.partition), ("--time", spec.time), ("--account", spec.account),
                       ("--image", spec.image)):
        if value:
            parts += [opt, value]
    for opt, value, default in (("--max-restarts", spec.max_restarts, 1), ("--port", spec.port, RDZV_PORT),
                                ("--job-name", spec.job_name, "ecdit"), ("--signal-lead", spec.signal_lead_s, 300)):
        if value != default and (opt != "--signal-lead" or spec.kind == "slurm"):
            parts += [opt, str(value)]
    if spec.sets:
        parts += ["--set", *spec.sets]
    return shlex.join(parts)


def render(spec: JobSpec) -> str:
    """The job file's text for spec.kind."""
    from ecdit_dist.launch import hostfile, k8s, local, slurm

    return {"slurm": slurm.render, "hostfile": hostfile.render, "k8s": k8s.render, "local": local.render}[spec.kind](spec)


def run_command(spec: JobSpec, path: str) -> list[str]:
    """What `--run` executes with the written file."""
    return {"slurm": ["sbatch", path], "k8s": ["kubectl", "apply", "-f", path]}.get(spec.kind, ["bash", path])
