"""A bash script that starts one torchrun agent per host of a DeepSpeed-style hostfile over ssh
(or any command run as `RSH HOST COMMAND`, e.g. `ECDIT_RSH="pdsh -R ssh -w"`), in the same
working directory on every host. The first host holds the rendezvous."""

from __future__ import annotations

from ecdit_dist.launch import JobSpec
from ecdit_dist.launch.common_sh import agents_script


def render(spec: JobSpec) -> str:
    return agents_script(spec, spec.hosts, remote=True,
                         what=f"hostfile job: {spec.nodes} host(s) x {spec.nproc_per_node} rank(s), over ssh")
