"""`ecdit launch {slurm,hostfile,k8s,local}`: argument parsing; the jobs are written by the modules beside it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ecdit_dist.launch import KINDS, JobSpec, LaunchError, read_hostfile, render, run_command, validate

EXAMPLES = """examples:
  ecdit launch slurm --config configs/tiny-cpu.yaml --nodes 2 --nproc-per-node 8 --time 24:00:00 --out job.sbatch
  ecdit launch slurm --config configs/tiny-cpu.yaml --nodes 2 --nproc-per-node 2 --cpu --set parallel.tp=2 parallel.ep=2 --run
  ecdit launch hostfile --hostfile hosts.txt --config FILE --nodes 2 --nproc-per-node 8 --out job.sh
  ecdit launch k8s --image registry/ecdit:latest --config FILE --nodes 4 --nproc-per-node 8 --out job.yaml
  ecdit launch local --config configs/tiny-cpu.yaml --nodes 2 --nproc-per-node 2 --cpu --run
"""

HELP = {
    "slurm": "an sbatch script: one srun task per node running torchrun; requeue + resume on preemption",
    "hostfile": "a bash script starting torchrun on each host of a DeepSpeed hostfile over ssh (or pdsh)",
    "k8s": "a Kubeflow PyTorchJob manifest (Master + Workers, c10d rendezvous)",
    "local": "a bash script starting N torchrun agents on this machine",
}
DEFAULT_OUT = {"slurm": "job.sbatch", "hostfile": "job.sh", "k8s": "job.yaml", "local": "job.sh"}


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="write (and start) a multi-node job: slurm, hostfile, k8s, local",
                       description="Write the job that runs one torchrun agent per node with c10d rendezvous on the "
                                   "first node. The layout is checked for nodes x nproc-per-node before anything "
                                   "is written. See docs/LAUNCH.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in KINDS:
        k = kinds.add_parser(kind, help=HELP[kind], description=HELP[kind])
        k.add_argument("--config", required=True, help="YAML run configuration (the same path on every node)")
        k.add_argument("--nodes", type=int, required=True, help="machines (torchrun agents)")
        k.add_argument("--nproc-per-node", type=int, required=True, help="ranks per machine (GPUs per node)")
        k.add_argument("--cpu", action="store_true", help="no GPUs: gloo backend, CUDA hidden")
        k.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="config overrides passed to every rank")
        k.add_argument("--max-restarts", type=int, default=1, help="torchrun's elastic restarts of the worker group")
        k.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
        k.add_argument("--job-name", default="ecdit", help="job name (Slurm job, PyTorchJob name)")
        k.add_argument("--out", default=None, help=f"write the job here (default with --run: {DEFAULT_OUT[kind]})")
        k.add_argument("--dry-run", action="store_true", help="print the job and the command that would run it")
        k.add_argument("--run", action="store_true",
                       help={"slurm": "submit it with sbatch", "k8s": "apply it with kubectl"}.get(kind, "start it"))
        if kind == "slurm":
            k.add_argument("--partition", default=None)
            k.add_argument("--account", default=None)
            k.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS")
            k.add_argument("--signal-lead", type=int, default=300,
                           help="seconds before the time limit at which the job saves and requeues (default 300)")
        if kind == "hostfile":
            k.add_argument("--hostfile", required=True, help="DeepSpeed format: one `HOST slots=N` per line")
        if kind == "k8s":
            k.add_argument("--image", required=True, help="container image built from docker/Dockerfile")
        k.set_defaults(func=cmd_launch)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = JobSpec(kind=args.kind, config=args.config, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                   cpu=args.cpu, sets=list(args.set), max_restarts=args.max_restarts, port=args.port,
                   job_name=args.job_name, partition=getattr(args, "partition", None),
                   account=getattr(args, "account", None), time=getattr(args, "time", None),
                   image=getattr(args, "image", None), signal_lead_s=getattr(args, "signal_lead", 300))
    if args.kind == "hostfile":
        hosts = read_hostfile(args.hostfile)
        bad = [f"{h} (slots={s})" for h, s in hosts if s < args.nproc_per_node]
        if bad:
            raise LaunchError(f"--nproc-per-node {args.nproc_per_node} is more than the slots of {', '.join(bad)}")
        spec.hosts = [h for h, _ in hosts]
    return validate(spec)


def cmd_launch(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    text = render(spec)
    out = args.out or DEFAULT_OUT[spec.kind]
    command = run_command(spec, out)
    if args.dry_run:
        print(text, end="")
        print(f"# --run would write this to {out} and execute: {' '.join(command)}", file=sys.stderr)
        return 0
    if args.out is None and not args.run:
        print(text, end="")
        return 0
    if spec.kind == "slurm":      # sbatch opens its --output file before the script runs
        Path(spec.run_dir, "logs").mkdir(parents=True, exist_ok=True)
    path = Path(out)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755 if spec.kind != "k8s" else 0o644)
    tmp.replace(path)
    print(f"wrote {path} ({spec.kind}: {spec.nodes} node(s) x {spec.nproc_per_node} rank(s) = world {spec.world})",
          file=sys.stderr)
    if not args.run:
        return 0
    print(f"+ {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(command)
