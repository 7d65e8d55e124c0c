"""Expert-parallel all-to-all: our dispatch + combine against raw all_to_all_single, the two
exchange forms, and the split of a 4-rank tiny training step into phases.

    python benchmarks/alltoall_dispatch.py                  # 4 CPU ranks, gloo
    python benchmarks/alltoall_dispatch.py --json out.json
    python benchmarks/alltoall_dispatch.py --skip-step --backward --experts 64   # exchange forms only

Part 1 is `ecdit profile a2a` (ecdit_dist.profiling.a2a) at one size: 8 experts, 4096
tokens x 512 per rank, f_c = 2 (16 MiB per rank), ep = all ranks. Part 2 sends the same bytes
through the dispatch and combine hooks of ecdit_dist.parallel.ep around an identity expert, in
each exchange form (parallel.ep_exchange): `per_expert` (one call per local expert, no copies)
and `single` (one call per direction, one permute copy on each side), forward and, with
`--backward`, also backward; calls are interleaved and the median is kept, and the backend's
default form (auto) is printed beside them. Part 3 runs configs/tiny-cpu.yaml with tp=2, ep=2
and reports the per-phase step timers of `logging.timers` (ecdit_dist.profiling.phases).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def dispatch_bench(rank: int, world: int, tokens: int, dim: int, experts: int, repeats: int,
                   backward: bool = False) -> dict:
    import torch.distributed as dist

    from ecdit_dist.parallel.ep import _combine_hook, _dispatch_hook, resolve_exchange

    dist.init_process_group("gloo")
    try:
        group = dist.group.WORLD
        T = tokens // experts * 2                       # C tokens per expert per group, capacity factor 2
        x = torch.randn(experts, T, dim)
        hooks = {form: (_dispatch_hook(group, world, form), _combine_hook(group, world, form))
                 for form in ("per_expert", "single")}
        flat = x.reshape(-1, dim)
        out = torch.empty_like(flat)

        def raw():
            dist.all_to_all_single(out, flat, group=group)
            dist.all_to_all_single(flat, out, group=group)

        def raw_alloc():                                 # same, but every call gets a new output buffer
            o = torch.empty_like(flat)
            dist.all_to_all_single(o, flat, group=group)
            dist.all_to_all_single(torch.empty_like(flat), o, group=group)

        def ep(form):
            dispatch, combine = hooks[form]
            xg = x.detach().requires_grad_(backward)
            local = dispatch(None, (xg,))[0]             # (E_local, world * T, d)
            out = combine(None, None, local)             # (E, T, d)
            if backward:
                out.backward(x)

        contenders = [("raw", raw), ("raw_alloc", raw_alloc), ("ep_per_expert", lambda: ep("per_expert")),
                      ("ep_single", lambda: ep("single"))]
        times = {name: [] for name, _ in contenders}
        for i in range(repeats + 2):
            for name, fn in contenders:
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        if backward:   # the hooks moved the bytes twice more (gradients); compare per round trip
            med["ep_per_expert"] /= 2
            med["ep_single"] /= 2
        return {"bytes_per_rank": x.numel() * 4, "seconds": med, "backward": backward,
                "default": resolve_exchange("auto", group),
                "raw_over_per_expert": med["raw"] / med["ep_per_expert"],
                "raw_over_single": med["raw"] / med["ep_single"],
                "single_over_per_expert": med["ep_single"] / med["ep_per_expert"]}
    finally:
        dist.destroy_process_group()


def step_bench(rank: int, world: int, steps: int, warmup: int, overrides: list[str], run_dir: str) -> dict:
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml",
                      [*overrides, f"run.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
                       "sample.at_end=false", "checkpoint.resume=false", "logging.timers=true"])
    trainer = Trainer(cfg)
    try:
        for s in range(warmup + steps):
            trainer.profiler.begin(s)
            trainer.train_step(s)
            trainer.profiler.end(s)
            if s == warmup - 1:
                trainer.profiler.metrics()                  # drop the warm-up steps
        return {"layout": trainer.dims.describe(), "per_step": trainer.profiler.metrics()}
    finally:
        trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="tokens each rank routes (part 1)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (part 2)")
    p.add_argument("--backward", action="store_true", help="part 2 also runs the exchanges' backward")
    p.add_argument("--skip-step", action="store_true", help="parts 1 and 2 only")
    p.add_argument("--json")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import describe, machine_info

    print(f"machine: {describe(machine_info())}", flush=True)

    from ecdit_dist.parallel.local import run_ranks

    nbytes = args.experts * (args.tokens * 2 // args.experts) * args.dim * 4       # (E, C*G, d) fp32, f_c = 2
    s = None
    with tempfile.TemporaryDirectory() as tmp:
        a2a_json = Path(tmp) / "a2a.json"
        subprocess.run([sys.executable, "-m", "ecdit_dist.profiling.a2a", "--nproc", str(args.ranks),
                        "--ep", str(args.ranks), "--sizes", str(nbytes), "--experts", str(args.experts),
                        "--hidden", str(args.dim), "--iters", str(args.repeats), "--json", str(a2a_json)],
                       check=True, timeout=1800)
        a2a = json.loads(a2a_json.read_text())
        d = run_ranks(dispatch_bench, args.ranks, Path(tmp) / "a", args.tokens, args.dim, args.experts,
                      args.repeats, args.backward, timeout=1800)[0]
        if not args.skip_step:
            s = run_ranks(step_bench, args.ranks, Path(tmp) / "b", args.steps, 3,
                          ["parallel.tp=2", "parallel.ep=2"], str(Path(tmp) / "run"), timeout=1800)[0]
    what = "forward + backward, per round trip" if args.backward else "forward"
    print(f"\npart 2: {args.ranks} ranks, {d['bytes_per_rank'] / 2**20:.1f} MiB per rank each way, {what}; "
          f"median of {args.repeats}; default form on this backend: {d['default']}")
    print("| | raw all_to_all_single x2 | raw, new output buffers | EP per_expert | EP single | raw / per_expert |"
          " raw / single | single / per_expert |")
    print("|---|---|---|---|---|---|---|---|")
    sec = d["seconds"]
    print(f"| seconds | {sec['raw']:.4f} | {sec['raw_alloc']:.4f} | {sec['ep_per_expert']:.4f} | {sec['ep_single']:.4f} "
          f"| {d['raw_over_per_expert']:.3f} | {d['raw_over_single']:.3f} | {d['single_over_per_expert']:.3f} |")
    if s is not None:
        print(f"\npart 3: tiny-cpu, {s['layout']}, ms per training step")
        phases = ("attention", "route", "dispatch_a2a", "experts", "combine_a2a", "fsdp_gather", "fsdp_reduce",
                  "optimizer", "other", "step")
        print("| " + " | ".join(phases) + " |")
        print("|" + "---|" * len(phases))
        print("| " + " | ".join(f"{s['per_step'][f'time/{k}_ms']:.1f}" for k in phases) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"a2a": a2a, "dispatch": d, "step": s}, indent=1))


if __name__ == "__main__":
    main()
