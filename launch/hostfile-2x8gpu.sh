#!/bin/bash
# hostfile job: 2 host(s) x 8 rank(s), over ssh
# Written by: ecdit launch hostfile --config configs/tiny-cpu.yaml --nodes 2 --nproc-per-node 8 --set parallel.ep=4
# Regenerate it with that command, or edit it here: every setting is visible below.

set -uo pipefail

# ---- environment (override any of these by exporting it before submitting)
# CPU threads per rank for intra-op work (torchrun's own default)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# a failed or timed-out NCCL collective aborts the rank instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# on a collective timeout, dump the flight recorder
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# flight recorder: keep the last N collectives per rank (0 turns it off)
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
# the watchdog kills a rank whose NCCL work is stuck this long
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}
# ranks get a fresh store per restart attempt; sharing torchrun's rendezvous store can hand a restarted group stale addresses
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun: seconds between forwarding SIGTERM and SIGKILL to workers; must cover one step + one checkpoint write
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

# ---- hosts: the first one hosts torchrun's c10d rendezvous store
HOSTS=(node001 node002)
HEAD=${HOSTS[0]}
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-$(date +%s)-$$}     # unique per job; agents with the same id join one job
LOG_DIR=${LOG_DIR:-runs/tiny-cpu/logs}
mkdir -p "$LOG_DIR"
read -r -a RSH <<< "${ECDIT_RSH:-ssh -o BatchMode=yes}"   # run as: RSH HOST COMMAND
WORKDIR=${WORKDIR:-$PWD}                                # the same path on every host

# ---- the per-node command (torchrun resumes from the newest checkpoint in run.dir by itself)
TORCHRUN=(
  torchrun
  --nnodes=2
  --nproc-per-node=8
  --rdzv-backend=c10d
  "--rdzv-endpoint=${HEAD}:${RDZV_PORT}"
  "--rdzv-id=${RDZV_ID}"
  --max-restarts=1
  "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
)
TRAIN=(
  -m
  ecdit_dist.train
  --config
  configs/tiny-cpu.yaml
  --set
  parallel.ep=4
)

ENV_NAMES=(OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_FR_BUFFER_SIZE TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC TORCH_DISABLE_SHARE_RDZV_TCP_STORE TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
# $1 = host, $2 = its index: cd, the environment above, torchrun with the host's own address;
# the first host hosts the rendezvous store (said explicitly: its name need not be its hostname)
remote_command() {
  local name assigns=''
  for name in "${ENV_NAMES[@]}"; do assigns+="$name=$(printf %q "${!name}") "; done
  printf 'cd %q && env %s' "$WORKDIR" "$assigns"
  printf '%q ' "${TORCHRUN[@]}" "--local-addr=$1" "--rdzv-conf=is_host=$(( $2 == 0 ))" "${TRAIN[@]}"
}

PIDS=()
for i in "${!HOSTS[@]}"; do
  "${RSH[@]}" "${HOSTS[$i]}" "$(remote_command "${HOSTS[$i]}" "$i")" > "$LOG_DIR/node-$i.log" 2>&1 &
  PIDS+=("$!")
done
echo "started ${#HOSTS[@]} agent(s), rendezvous ${HEAD}:${RDZV_PORT} id ${RDZV_ID}; logs in $LOG_DIR/node-N.log"

# ---- SIGTERM/SIGINT/SIGUSR1 to this script reach every agent (each forwards to its ranks)
trap 'echo "got TERM: forwarding it to the agents"; kill -s TERM "${PIDS[@]}" 2>/dev/null' TERM
trap 'echo "got INT: forwarding it to the agents"; kill -s INT "${PIDS[@]}" 2>/dev/null' INT
trap 'echo "got USR1: forwarding it to the agents"; kill -s USR1 "${PIDS[@]}" 2>/dev/null' USR1

# the first non-zero exit status of an agent is the script's (after a preemption too: run it again to resume)
STATUS=0
for pid in "${PIDS[@]}"; do
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break     # `wait` returned early for a trapped signal
  done
  if [ "$STATUS" = 0 ] && [ "$rc" != 0 ]; then STATUS=$rc; fi
done
exit "$STATUS"
