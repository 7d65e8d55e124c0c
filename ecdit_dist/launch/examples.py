"""The ready-to-edit jobs in launch/, each written by `ecdit launch` with the arguments below.

Regenerate them all (from the repository root) with `python -m ecdit_dist.launch.examples`;
tests/test_launch.py fails when a file in launch/ differs from what this code writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY = "configs/tiny-cpu.yaml"
EXAMPLES: dict[str, list[str]] = {
    "slurm-2x8gpu.sbatch": ["slurm", "--config", TINY, "--nodes", "2", "--nproc-per-node", "8", "--partition", "gpu",
                            "--time", "24:00:00", "--set", "parallel.ep=4", "train.precision=bf16"],
    "slurm-cpu-2x2.sbatch": ["slurm", "--config", TINY, "--nodes", "2", "--nproc-per-node", "2", "--cpu",
                             "--time", "01:00:00", "--set", "parallel.tp=2", "parallel.ep=2"],
    "hostfile-2x8gpu.sh": ["hostfile", "--hostfile", "launch/hostfile", "--config", TINY, "--nodes", "2",
                           "--nproc-per-node", "8", "--set", "parallel.ep=4"],
    "pytorchjob-2x8gpu.yaml": ["k8s", "--image", "registry.example.com/ecdit:latest", "--config", TINY,
                               "--nodes", "2", "--nproc-per-node", "8", "--set", "parallel.ep=4"],
    "local-2x2cpu.sh": ["local", "--config", TINY, "--nodes", "2", "--nproc-per-node", "2", "--cpu",
                        "--set", "parallel.tp=2", "parallel.ep=2"],
}


def render_example(name: str) -> str:
    import argparse

    from ecdit_dist.launch import render
    from ecdit_dist.launch.cli import add_launch, spec_from_args

    parser = argparse.ArgumentParser()
    add_launch(parser.add_subparsers(dest="command"))
    return render(spec_from_args(parser.parse_args(["launch", *EXAMPLES[name]])))


def main(root: str = "launch") -> int:
    for name in EXAMPLES:
        path = Path(root) / name
        path.write_text(render_example(name))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
