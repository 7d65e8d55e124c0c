"""Export throughput against `cp` of the same bytes, and export's peak memory.

    python benchmarks/export.py                      # ~1 GB checkpoint in a temporary folder
    python benchmarks/export.py --hidden 1024 --experts 8 --layers 8 --json out.json

A training checkpoint (DCP) of a synthetic EC-DiT is written once; then, alternating, `cp -r`
copies its folder and `ecdit convert export` streams it into safetensors, each in a fresh
child process. Throughput is bytes per second of each (same bytes read and written); peak
memory is the exporting child's maximum RSS above an idle child that imported the same modules.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cold_cache

# peak RSS from VmHWM: it starts fresh at exec, unlike ru_maxrss, which keeps the forking parent's peak
PROBE = """
import re, sys, time
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import ecdit_dist.checkpoint.convert as C
base = hwm()
t0 = time.perf_counter()
if sys.argv[1] != "-":
    C.export(sys.argv[1], sys.argv[2], max_shard_size="2GB")
dt = time.perf_counter() - t0
print(base, hwm(), dt)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json")
    args = p.parse_args()

    from ecdit_dist.checkpoint.manager import CheckpointManager
    from ecdit_dist.config import config_from_dict
    from ecdit_dist.model import ECDiT

    work = Path(args.dir or tempfile.mkdtemp(prefix="ecdit-export-"))
    raw = {"model": {"preset": "tiny", "hidden_dim": args.hidden, "num_layers": args.layers,
                     "num_heads": args.hidden // 64, "num_kv_heads": args.hidden // 128},
           "moe": {"num_experts": args.experts}}
    cfg = config_from_dict(raw, validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    state = model.state_dict()
    total = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    CheckpointManager(work / "run").save(1, {"model": state, "trainer": {"step": torch.tensor(1)}},
                                        {"config": cfg.to_dict(), "contents": ["model", "trainer"]})
    del model, state
    ckpt = work / "run" / "checkpoints" / "step-00000001"
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())

    idle = subprocess.run([sys.executable, "-c", PROBE, "-", "-"], capture_output=True, text=True, check=True)
    idle_peak = int(idle.stdout.split()[1])
    cp_s, ex_s, ex_fn_s, peaks = [], [], [], []
    for i in range(args.repeats):
        shutil.rmtree(work / "cp", ignore_errors=True)
        cold_cache()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(ckpt), str(work / "cp")], check=True)
        subprocess.run(["sync"], check=True)
        cp_s.append(time.perf_counter() - t0)
        shutil.rmtree(work / "out", ignore_errors=True)
        cold_cache()
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, str(ckpt), str(work / "out")], capture_output=True,
                             text=True, check=True)
        subprocess.run(["sync"], check=True)
        ex_s.append(time.perf_counter() - t0)
        base, peak, fn_s = out.stdout.split()
        peaks.append(int(peak))
        ex_fn_s.append(float(fn_s))
    res = {
        "model_bytes": total, "checkpoint_bytes": ckpt_bytes, "largest_tensor_bytes": largest,
        "cp_s": statistics.median(cp_s), "export_s": statistics.median(ex_s),
        "export_in_process_s": statistics.median(ex_fn_s),
        "export_over_cp_throughput": statistics.median(cp_s) / statistics.median(ex_s),
        "idle_peak_rss": idle_peak, "export_peak_rss": max(peaks),
        "export_peak_rss_above_idle": max(peaks) - idle_peak,
    }
    mb = 2**20
    print(f"checkpoint {ckpt_bytes / mb:.0f} MiB, largest tensor {largest / mb:.0f} MiB")
    print("| cp + sync s | export + sync s (in process) | export / cp throughput | export peak RSS above idle |"
          " largest tensor |")
    print("|---|---|---|---|---|")
    print(f"| {res['cp_s']:.2f} | {res['export_s']:.2f} ({res['export_in_process_s']:.2f}) | "
          f"{res['export_over_cp_throughput']:.2f} | "
          f"{res['export_peak_rss_above_idle'] / mb:.0f} MiB | {largest / mb:.0f} MiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
