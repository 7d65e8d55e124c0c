"""Shell fragments shared by the bash-based job scripts."""

from __future__ import annotations

import shlex

from ecdit_dist.launch import JobSpec, command_line, env_lines


def header(spec: JobSpec, what: str) -> list[str]:
    return [f"# {what}",
            f"# Written by: {command_line(spec)}",
            "# Regenerate it with that command, or edit it here: every setting is visible below."]


def bash_array(name: str, argv: list[str], raw: dict[int, str] | None = None) -> list[str]:
    """`NAME=(...)`, one argument per line; arguments listed in `raw` are shell expressions kept unquoted."""
    raw = raw or {}
    items = [raw.get(i, f'"{a}"' if "," in a and shlex.quote(a) == a else shlex.quote(a)) for i, a in enumerate(argv)]
    return [f"{name}=(", *[f"  {item}" for item in items], ")"]


def command_arrays(argv: list[str], raw: dict[int, str]) -> list[str]:
    """TORCHRUN=(torchrun and its options) and TRAIN=(-m ecdit_dist.train ...): a node adds its own
    torchrun options between the two."""
    cut = argv.index("-m")
    return [*bash_array("TORCHRUN", argv[:cut], raw), *bash_array("TRAIN", argv[cut:])]


def environment(spec: JobSpec) -> list[str]:
    return ["# ---- environment (override any of these by exporting it before submitting)", *env_lines(spec)]


def agents_script(spec: JobSpec, hosts: list[str], remote: bool, what: str) -> str:
    """Start one agent per host in the background, forward TERM/INT/USR1 to them, wait for all."""
    from ecdit_dist.launch import torchrun_argv

    argv = torchrun_argv(spec, "PLACEHOLDER_ENDPOINT", "PLACEHOLDER_ID")
    raw = {argv.index("--rdzv-endpoint=PLACEHOLDER_ENDPOINT"): '"--rdzv-endpoint=${HEAD}:${RDZV_PORT}"',
           argv.index("--rdzv-id=PLACEHOLDER_ID"): '"--rdzv-id=${RDZV_ID}"'}
    lines = ["#!/bin/bash", *header(spec, what), "", "set -uo pipefail", ""]
    lines += [*environment(spec), "",
              "# ---- hosts: the first one hosts torchrun's c10d rendezvous store",
              "HOSTS=(" + " ".join(shlex.quote(h) for h in hosts) + ")",
              'HEAD=${HOSTS[0]}',
              f"RDZV_PORT=${{RDZV_PORT:-{spec.port}}}",
              'RDZV_ID=${RDZV_ID:-$(date +%s)-$$}     # unique per job; agents with the same id join one job',
              f"LOG_DIR=${{LOG_DIR:-{spec.run_dir}/logs}}",
              'mkdir -p "$LOG_DIR"']
    if remote:
        lines += ['read -r -a RSH <<< "${ECDIT_RSH:-ssh -o BatchMode=yes}"   # run as: RSH HOST COMMAND',
                  'WORKDIR=${WORKDIR:-$PWD}                                # the same path on every host']
    lines += ["", "# ---- the per-node command (torchrun resumes from the newest checkpoint in run.dir by itself)",
              *command_arrays(argv, raw), ""]
    if remote:
        lines += ["ENV_NAMES=(" + " ".join(ENV_NAMES(spec)) + ")",
                  "# $1 = host, $2 = its index: cd, the environment above, torchrun with the host's own address;",
                  "# the first host hosts the rendezvous store (said explicitly: its name need not be its hostname)",
                  "remote_command() {",
                  "  local name assigns=''",
                  '  for name in "${ENV_NAMES[@]}"; do assigns+="$name=$(printf %q "${!name}") "; done',
                  '  printf \'cd %q && env %s\' "$WORKDIR" "$assigns"',
                  '  printf \'%q \' "${TORCHRUN[@]}" "--local-addr=$1" "--rdzv-conf=is_host=$(( $2 == 0 ))" "${TRAIN[@]}"',
                  "}", ""]
    lines += ["PIDS=()",
              'for i in "${!HOSTS[@]}"; do']
    if remote:
        lines += ['  "${RSH[@]}" "${HOSTS[$i]}" "$(remote_command "${HOSTS[$i]}" "$i")" > "$LOG_DIR/node-$i.log" 2>&1 &']
    else:
        lines += ['  "${TORCHRUN[@]}" "${TRAIN[@]}" > "$LOG_DIR/node-$i.log" 2>&1 &']
    lines += ['  PIDS+=("$!")',
              'done',
              'echo "started ${#HOSTS[@]} agent(s), rendezvous ${HEAD}:${RDZV_PORT} id ${RDZV_ID}; logs in $LOG_DIR/node-N.log"',
              "",
              "# ---- SIGTERM/SIGINT/SIGUSR1 to this script reach every agent (each forwards to its ranks)",
              *[f"trap 'echo \"got {sig}: forwarding it to the agents\"; kill -s {sig} \"${{PIDS[@]}}\" 2>/dev/null' {sig}"
                for sig in ("TERM", "INT", "USR1")],
              "",
              "# the first non-zero exit status of an agent is the script's (after a preemption too: run it again to resume)",
              "STATUS=0",
              'for pid in "${PIDS[@]}"; do',
              '  while true; do',
              '    wait "$pid"',
              '    rc=$?',
              '    kill -0 "$pid" 2>/dev/null || break     # `wait` returned early for a trapped signal',
              '  done',
              '  if [ "$STATUS" = 0 ] && [ "$rc" != 0 ]; then STATUS=$rc; fi',
              'done',
              'exit "$STATUS"', ""]
    return "\n".join(lines)


def ENV_NAMES(spec: JobSpec) -> list[str]:  # noqa: N802 - reads like the bash array it fills
    from ecdit_dist.launch import ENV_DEFAULTS

    return [*ENV_DEFAULTS, *(["CUDA_VISIBLE_DEVICES"] if spec.cpu else [])]
