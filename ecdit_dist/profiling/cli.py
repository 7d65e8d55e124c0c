"""`ecdit profile <what>`: a2a (all-to-all bandwidth) and routing (expert-choice heatmaps)."""

from __future__ import annotations

import sys

COMMANDS = {
    "a2a": ("ecdit_dist.profiling.a2a", "all-to-all bandwidth: raw all_to_all_single vs the EP exchange"),
    "routing": ("ecdit_dist.profiling.routing", "experts per latent token while sampling, as heatmaps"),
    "timeline": ("ecdit_dist.profiling.timeline", "draw the phases of a training trace as a PNG"),
}


def usage() -> str:
    lines = ["usage: ecdit profile {a2a,routing,timeline} [--help] ...", "", "commands:"]
    lines += [f"  {name:9s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
