"""The sbatch script: one srun task per node, each running one torchrun agent.

Preemption and the time limit: `--requeue` lets Slurm put the job back in the queue, and
`--signal=B:USR1@LEAD` wakes the batch shell LEAD seconds before the time limit. The shell then
sends SIGTERM to the training step (torchrun forwards it; every rank saves the step it reached)
and, once the step has ended, requeues the job. `scancel`, `scontrol requeue` and preemption
send SIGTERM to every process themselves and give the job `KillWait` seconds. A restarted job
runs the same script and resumes from the newest checkpoint in run.dir.
"""

from __future__ import annotations

from ecdit_dist.launch import JobSpec, torchrun_argv
from ecdit_dist.launch.common_sh import command_arrays, environment, header


def render(spec: JobSpec) -> str:
    sb = [f"#SBATCH --job-name={spec.job_name}",
          f"#SBATCH --nodes={spec.nodes}",
          "#SBATCH --ntasks-per-node=1          # one torchrun agent per node; it starts the ranks"]
    if not spec.cpu:
        sb.append(f"#SBATCH --gpus-per-node={spec.nproc_per_node}")
    if spec.partition:
        sb.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        sb.append(f"#SBATCH --account={spec.account}")
    if spec.time:
        sb.append(f"#SBATCH --time={spec.time}")
    sb += ["#SBATCH --requeue                    # preempted or requeued jobs come back and resume",
           f"#SBATCH --signal=B:USR1@{spec.signal_lead_s}".ljust(37) + "# wake this script before the time limit",
           "#SBATCH --open-mode=append           # a requeued job appends to the same log",
           f"#SBATCH --output={spec.run_dir}/logs/slurm-%x-%j.out"]
    argv = torchrun_argv(spec, "PLACEHOLDER_ENDPOINT", "PLACEHOLDER_ID")
    raw = {argv.index("--rdzv-endpoint=PLACEHOLDER_ENDPOINT"): '"--rdzv-endpoint=${HEAD_NODE}:${RDZV_PORT}"',
           argv.index("--rdzv-id=PLACEHOLDER_ID"): '"--rdzv-id=${SLURM_JOB_ID}"'}
    lines = ["#!/bin/bash", *header(spec, f"Slurm job: {spec.nodes} node(s) x {spec.nproc_per_node} rank(s)"),
             *sb, "", "set -uo pipefail", "",
             *environment(spec), "",
             "# ---- rendezvous: the first node of the allocation hosts torchrun's c10d store",
             'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
             'HEAD_NODE=${NODES[0]}',
             f"RDZV_PORT=${{RDZV_PORT:-{spec.port}}}",
             f"mkdir -p {spec.run_dir}/logs",
             'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: nodes ${NODES[*]}, rendezvous ${HEAD_NODE}:${RDZV_PORT}"',
             "",
             "# ---- one torchrun per node; it resumes from the newest checkpoint in run.dir by itself",
             *command_arrays(argv, raw), "",
             "# ---- time limit near (USR1): stop the step (every rank saves), then requeue",
             "REQUEUE=0",
             "trap 'echo \"time limit near: stopping the training step, then requeueing job $SLURM_JOB_ID\"; "
             "REQUEUE=1; kill -TERM \"$SRUN_PID\" 2>/dev/null' USR1",
             "",
             f'srun --ntasks-per-node=1 --kill-on-bad-exit=0 --open-mode=append --output="{spec.run_dir}/logs/%x-%j-node%n.log" \\',
             '  "${TORCHRUN[@]}" "${TRAIN[@]}" &',
             "SRUN_PID=$!",
             "# `wait` returns early when a trapped signal arrives: wait until srun has really ended",
             "STATUS=0",
             'wait "$SRUN_PID" || STATUS=$?',
             'while kill -0 "$SRUN_PID" 2>/dev/null; do',
             '  STATUS=0',
             '  wait "$SRUN_PID" || STATUS=$?',
             "done",
             'if [ "$REQUEUE" = 1 ]; then',
             '  scontrol requeue "$SLURM_JOB_ID"',
             "fi",
             'exit "$STATUS"', ""]
    return "\n".join(lines)
