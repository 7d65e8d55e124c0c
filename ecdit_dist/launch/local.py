"""A bash script that starts N torchrun agents on this machine (one big node, or a rehearsal of a
multi-node job): the same per-node command as every other form, rendezvous on 127.0.0.1."""

from __future__ import annotations

from ecdit_dist.launch import JobSpec
from ecdit_dist.launch.common_sh import agents_script


def render(spec: JobSpec) -> str:
    hosts = ["127.0.0.1"] * spec.nodes
    return agents_script(spec, hosts, remote=False,
                         what=f"local job: {spec.nodes} torchrun agent(s) x {spec.nproc_per_node} rank(s) on this machine")
