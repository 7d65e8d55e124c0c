"""Peak memory of the streaming `ecdit convert import` against model size and the largest tensor.

    python benchmarks/convert_import.py                         # d = 512, 12 and 24 blocks, fp32 and bf16
    python benchmarks/convert_import.py --layers 12 24 48 --json out.json

For each size a synthetic consolidated model (config.json + model.safetensors, random weights)
is written tensor by tensor; then it is imported in a fresh child process with the default
group size and, as the reference, with one group holding the whole model (what an import that
builds the whole state does). Peak memory is the child's VmHWM above its own level after
importing the modules; the time is wall time of the import in the child.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROBE = """
import re, sys, time
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import torch.distributed.checkpoint, safetensors.torch
import ecdit_dist.checkpoint.convert as C, ecdit_dist.checkpoint.stream_import
base = hwm()
t0 = time.perf_counter()
C.import_(sys.argv[1], sys.argv[2], group_size=sys.argv[3])
print(hwm() - base, time.perf_counter() - t0)
"""


def synthetic(folder: Path, hidden: int, layers: int, experts: int, dtype: torch.dtype) -> tuple[int, int, int]:
    from ecdit_dist.checkpoint.tensors import TensorInfo, expected_tensors, write_safetensors

    model = {"preset": "tiny", "hidden_dim": hidden, "num_layers": layers, "num_heads": hidden // 64,
             "num_kv_heads": hidden // 128}
    moe = {"num_experts": experts}
    infos = {k: TensorInfo(tuple(v), dtype) for k, v in expected_tensors(model, moe).items()}
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    write_safetensors(folder, infos, lambda n: torch.randn(infos[n].shape, generator=gen).to(dtype), 0)
    (folder / "config.json").write_text(json.dumps({"model": model, "moe": moe}))
    return len(infos), sum(i.nbytes for i in infos.values()), max(i.nbytes for i in infos.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--group-size", default="64MiB")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ecdit-import-"))
    rows = []
    mib = 2 ** 20
    print("| dtype | blocks | tensors | model MiB | largest tensor MiB | group | peak above idle MiB | import s |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for dt in args.dtypes:
            for layers in args.layers:
                src = work / f"src-{dt}-{layers}"
                n, total, largest = synthetic(src, args.hidden, layers, args.experts,
                                              torch.float32 if dt == "fp32" else torch.bfloat16)
                for group in (args.group_size, "1TB"):
                    run = work / "run"
                    shutil.rmtree(run, ignore_errors=True)
                    out = subprocess.run([sys.executable, "-c", PROBE, str(src), str(run), group],
                                         capture_output=True, text=True, timeout=1800, check=True)
                    peak, seconds = out.stdout.split()[-2:]
                    row = {"dtype": dt, "layers": layers, "tensors": n, "model_bytes": total,
                           "largest_tensor_bytes": largest, "group": group if group != "1TB" else "whole model",
                           "peak_above_idle_bytes": int(peak), "seconds": float(seconds)}
                    rows.append(row)
                    print(f"| {dt} | {layers} | {n} | {total / mib:.0f} | {largest / mib:.0f} | {row['group']} | "
                          f"{int(peak) / mib:.0f} | {float(seconds):.1f} |", flush=True)
                shutil.rmtree(src)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
