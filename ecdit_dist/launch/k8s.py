"""A Kubeflow training-operator `PyTorchJob`: one pod per node (1 Master + N-1 Workers), each
running the same torchrun command. The operator sets MASTER_ADDR/MASTER_PORT (the master
pod's service) which the rendezvous endpoint uses; `restartPolicy: OnFailure` restarts a failed
pod, and the run resumes from the newest checkpoint on the shared volume.

Kubernetes sends SIGTERM to the container's main process (torchrun, which forwards it) and
SIGKILL after `terminationGracePeriodSeconds`; that must cover one step + one checkpoint write.
"""

from __future__ import annotations

import yaml

from ecdit_dist.launch import ENV_DEFAULTS, JobSpec, command_line, torchrun_argv

GRACE_S = 180


def render(spec: JobSpec) -> str:
    argv = torchrun_argv(spec, "$(MASTER_ADDR):$(MASTER_PORT)", spec.job_name)
    env = [{"name": k, "value": v} for k, (v, _) in ENV_DEFAULTS.items()]
    if spec.cpu:
        env.append({"name": "CUDA_VISIBLE_DEVICES", "value": ""})
    resources = {} if spec.cpu else {"limits": {"nvidia.com/gpu": spec.nproc_per_node}}

    def replica(n: int) -> dict:
        container = {"name": "pytorch", "image": spec.image, "imagePullPolicy": "IfNotPresent",
                     "command": argv, "env": env, "workingDir": "/workspace",
                     "volumeMounts": [{"name": "runs", "mountPath": "/workspace/runs"},
                                      {"name": "dshm", "mountPath": "/dev/shm"}]}
        if resources:
            container["resources"] = resources
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"spec": {
                    "terminationGracePeriodSeconds": GRACE_S,
                    "containers": [container],
                    "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "ecdit-runs"}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {"name": spec.job_name},
           "spec": {"nprocPerNode": str(spec.nproc_per_node),
                    "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": spec.nodes, "maxReplicas": spec.nodes,
                                      "maxRestarts": spec.max_restarts, "nProcPerNode": spec.nproc_per_node},
                    "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 10},
                    "pytorchReplicaSpecs": replicas}}
    head = (f"# Kubeflow PyTorchJob: {spec.nodes} pod(s) x {spec.nproc_per_node} rank(s)\n"
            f"# Written by: {command_line(spec)}\n"
            "# Needs the training operator, an image built from docker/Dockerfile, and a ReadWriteMany\n"
            "# PersistentVolumeClaim `ecdit-runs` for run.dir (checkpoints survive pod restarts).\n"
            "# Environment (edit `env` below):\n"
            + "".join(f"#   {k}: {why}\n" for k, (_, why) in ENV_DEFAULTS.items()))
    return head + yaml.safe_dump(job, sort_keys=False, width=120)
