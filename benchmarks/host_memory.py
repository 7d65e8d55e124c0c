"""train.host_memory: time and peak memory of the expert-choice layer's forward + backward with
freed host blocks reused ("reuse", what CPU training does) against the C library's default
("release"), each mode in its own fresh process (the setting is process-wide and one-way),
alternating, as ratios reuse / release.

    python benchmarks/host_memory.py                      # E = 64, d = 512, d_ff = 2048, 8192 tokens, 10 passes, 2 rounds
    python benchmarks/host_memory.py --experts 8 --passes 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine_info  # noqa: E402

ONE_MODE = r"""
import json, re, sys, time, torch
from ecdit_dist.device import keep_host_memory
mode, experts, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
effect = keep_host_memory(mode, "cpu")
from ecdit_dist.model.moe import ExpertChoiceMoE
torch.manual_seed(0)
layer = ExpertChoiceMoE(512, 2048, experts, 2.0, 1024, expert_gemm="bmm")
x = torch.randn(1, 8192, 512)
times = []
for _ in range(passes):
    t0 = time.perf_counter()
    xi = x.detach().requires_grad_(True)
    out = layer(xi)
    out.backward(torch.ones_like(out))
    for p in layer.parameters():
        p.grad = None
    times.append(time.perf_counter() - t0)
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"effect": effect, "seconds": sorted(times[1:])[len(times[1:]) // 2], "peak_bytes": hwm}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--passes", type=int, default=10, help="forward + backward passes per process (median of all but the first)")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    args = p.parse_args()
    print(f"machine: {describe(machine_info())}", flush=True)
    runs: dict[str, list[dict]] = {"release": [], "reuse": []}
    for _ in range(args.rounds):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", ONE_MODE, mode, str(args.experts), str(args.passes)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            print(f"  {mode} ({r['effect']}): {r['seconds']:.3f} s per pass, peak {r['peak_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_bytes")} for m, rs in runs.items()}
    print(f"E = {args.experts}, d = 512, d_ff = 2048, 8192 tokens, forward + backward, median of {args.rounds} processes")
    print("| host memory | s per pass | peak MiB |")
    print("|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v['seconds']:.3f} | {v['peak_bytes'] / 2**20:.0f} |")
    print(f"| reuse / release | {med['reuse']['seconds'] / med['release']['seconds']:.3f} | "
          f"{med['reuse']['peak_bytes'] / med['release']['peak_bytes']:.3f} |")


if __name__ == "__main__":
    main()
