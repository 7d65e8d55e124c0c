"""`ecdit convert` export, import, merge (3 inputs) and upcycle against `cp`: throughput and peak memory.

    python benchmarks/convert.py                          # d = 1024, 8 experts, 12 and 24 blocks (~2.2 and ~4.3 GiB)
    python benchmarks/convert.py --layers 8 --json out.json

For each size: a training checkpoint (DCP, one process) of a synthetic EC-DiT with random
weights is written once, then, each from a cold page cache (`sync`, `drop_caches`) and in a
fresh child process:

* `cp -r` of the checkpoint folder + `sync`: the baseline (bytes per second);
* `export` (default `--verify sha256`, and `--verify size`) -> consolidated safetensors;
* `import` of that export -> a step-0 training checkpoint;
* `merge` of three inputs: the checkpoint, the export and the imported checkpoint;
* `upcycle` of a dense synthetic model (safetensors) into 8 experts per MoE layer, sized so
  that its output is about the checkpoint's size.

Each operation's time is its time inside the child (after the child imported its modules) plus a
`sync` after it; cp's is `cp -r` plus `sync`. Throughput is the bytes an operation writes per second,
compared with cp's bytes per second (`x cp`). Peak memory is the child's VmHWM above an idle child
that imported the same modules, reported against the largest tensor the operation handles.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cold_cache, describe, machine_info

PROBE = """
import json, re, sys, time
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import torch, safetensors.torch, torch.distributed.checkpoint
import ecdit_dist.checkpoint.convert as C, ecdit_dist.checkpoint.stream_import, ecdit_dist.model, ecdit_dist.config
C.expected_tensors({"preset": "tiny"}, {"num_experts": 2})
base = hwm()
t0 = time.perf_counter()
if sys.argv[1] != "-":
    getattr(C, sys.argv[1])(**json.loads(sys.argv[2]))
print(base, hwm(), time.perf_counter() - t0)
"""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_op(op: str, kwargs: dict, out: Path) -> dict:
    """One operation in a fresh child process from a cold cache; seconds include a sync after it."""
    cold_cache()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, op, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{op} failed: {done.stderr[-3000:]}")
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - t1
    base, peak, inside = done.stdout.split()[-3:]
    # the operation itself (after the child imported its modules) plus the sync of what it wrote
    return {"seconds": float(inside) + sync_s, "in_process_s": float(inside), "child_s": t1 - t0,
            "peak": int(peak), "written": folder_bytes(out)}


def synthetic_checkpoint(run: Path, hidden: int, layers: int, experts: int) -> tuple[Path, int]:
    from ecdit_dist.checkpoint.manager import CheckpointManager
    from ecdit_dist.checkpoint.tensors import expected_tensors
    from ecdit_dist.config import config_from_dict

    raw = {"model": {"preset": "tiny", "hidden_dim": hidden, "num_layers": layers, "num_heads": hidden // 64,
                     "num_kv_heads": hidden // 128}, "moe": {"num_experts": experts}}
    cfg = config_from_dict(raw, validate=False)
    gen = torch.Generator().manual_seed(layers)
    state = {k: torch.rand(v, generator=gen) - 0.5 for k, v in expected_tensors(cfg.to_dict()["model"],
                                                                                 cfg.to_dict()["moe"]).items()}
    largest = max(v.numel() * 4 for v in state.values())
    CheckpointManager(run).save(1, {"model": state, "trainer": {"step": torch.tensor(1)}},
                                {"config": cfg.to_dict(), "contents": ["model", "trainer"]})
    return run / "checkpoints" / "step-00000001", largest


def synthetic_dense(folder: Path, hidden: int, layers: int) -> int:
    from ecdit_dist.checkpoint.tensors import TensorInfo, expected_tensors, write_safetensors

    model = {"preset": "tiny-dense", "hidden_dim": hidden, "num_layers": layers, "num_heads": hidden // 64,
             "num_kv_heads": hidden // 128}
    infos = {k: TensorInfo(tuple(v), torch.float32) for k, v in expected_tensors(model, {"num_experts": 0}).items()}
    gen = torch.Generator().manual_seed(layers)
    folder.mkdir(parents=True)
    write_safetensors(folder, infos, lambda n: torch.rand(infos[n].shape, generator=gen) - 0.5, 0)
    (folder / "config.json").write_text(json.dumps({"model": model, "moe": {"num_experts": 0}}))
    return max(i.nbytes for i in infos.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ecdit-convert-"))
    mib, rows = 2 ** 20, []
    info = machine_info()
    print(describe(info), flush=True)
    idle = subprocess.run([sys.executable, "-c", PROBE, "-", "{}"], capture_output=True, text=True, check=True)
    idle_peak = int(idle.stdout.split()[1])
    print("| blocks | op | reads GiB | writes GiB | s (in process) | x cp | peak above idle MiB | largest tensor MiB |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for layers in args.layers:
            size_dir = work / f"L{layers}"
            shutil.rmtree(size_dir, ignore_errors=True)
            ckpt, largest = synthetic_checkpoint(size_dir / "run", args.hidden, layers, args.experts)
            ckpt_bytes = folder_bytes(ckpt)
            # a dense model whose upcycled output is about the checkpoint's size (MoE every 2nd block)
            dense_largest = synthetic_dense(size_dir / "dense", args.hidden, layers)
            dense_bytes = folder_bytes(size_dir / "dense")

            cold_cache()
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(ckpt), str(size_dir / "cp")], check=True)
            subprocess.run(["sync"], check=True)
            cp_s = time.perf_counter() - t0
            cp_rate = ckpt_bytes / cp_s
            shutil.rmtree(size_dir / "cp")
            ops = [
                ("cp", None, None, ckpt_bytes, largest),
                ("export (sha256)", "export", {"checkpoint": str(ckpt), "out": str(size_dir / "exp"),
                                               "max_shard_size": "2GB", "workers": args.workers},
                 ckpt_bytes, largest),
                ("export (size)", "export", {"checkpoint": str(ckpt), "out": str(size_dir / "exp2"),
                                             "max_shard_size": "2GB", "verify": "size", "workers": args.workers},
                 ckpt_bytes, largest),
                ("import", "import_", {"src_path": str(size_dir / "exp"), "run_dir": str(size_dir / "imp")},
                 ckpt_bytes, largest),
                ("merge (3 inputs)", "merge", {"inputs": [str(ckpt), str(size_dir / "exp"), str(size_dir / "imp")],
                                               "out": str(size_dir / "merged"), "max_shard_size": "2GB",
                                               "workers": args.workers}, None, largest),
                ("upcycle", "upcycle", {"src_path": str(size_dir / "dense"), "out": str(size_dir / "up"),
                                        "num_experts": args.experts, "max_shard_size": "2GB",
                                        "workers": args.workers}, dense_bytes, None),
            ]
            for label, op, kwargs, reads, big in ops:
                if op is None:
                    row = {"seconds": cp_s, "in_process_s": cp_s, "peak": idle_peak, "written": ckpt_bytes}
                else:
                    out = Path(kwargs.get("out") or Path(kwargs["run_dir"]))
                    row = run_op(op, kwargs, out)
                if label.startswith("merge"):
                    reads = 3 * ckpt_bytes          # the model tensors of each input (the import also holds the EMA)
                if label == "upcycle":
                    big = max(dense_largest * args.experts, largest)
                row.update({"layers": layers, "op": label, "reads": reads, "largest_tensor": big,
                            "x_cp": (row["written"] / row["seconds"]) / cp_rate,
                            "peak_above_idle": row["peak"] - idle_peak, "loadavg_1m": machine_info()["loadavg_1m"]})
                rows.append(row)
                print(f"| {layers} | {label} | {reads / 2**30:.2f} | {row['written'] / 2**30:.2f} | "
                      f"{row['seconds']:.1f} ({row['in_process_s']:.1f}) | {row['x_cp']:.2f} | "
                      f"{row['peak_above_idle'] / mib:.0f} | {big / mib:.0f} |", flush=True)
                if label == "export (size)":
                    shutil.rmtree(size_dir / "exp2")
            shutil.rmtree(size_dir, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {machine_info()['loadavg_1m']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
