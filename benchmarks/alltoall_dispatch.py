"""Expert-parallel all-to-all: our dispatch + combine against raw all_to_all_single, and the
split of a 4-rank tiny training step into phases.

    python benchmarks/alltoall_dispatch.py                  # 4 CPU ranks, gloo
    python benchmarks/alltoall_dispatch.py --json out.json

Part 1 is `ecdit profile a2a` (ecdit_dist.profiling.a2a) at one size: 8 experts, 4096
tokens x 512 per rank, f_c = 2 (16 MiB per rank), ep = all ranks. Part 2 runs
configs/tiny-cpu.yaml with tp=2, ep=2 and reports the per-phase step timers of
`logging.timers` (ecdit_dist.profiling.phases), forward and backward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    p.add_argument("--json")
    args = p.parse_args()

    from ecdit_dist.parallel.local import run_ranks

    nbytes = args.experts * (args.tokens * 2 // args.experts) * args.dim * 4       # (E, C*G, d) fp32, f_c = 2
    with tempfile.TemporaryDirectory() as tmp:
        a2a_json = Path(tmp) / "a2a.json"
        subprocess.run([sys.executable, "-m", "ecdit_dist.profiling.a2a", "--nproc", str(args.ranks),
                        "--ep", str(args.ranks), "--sizes", str(nbytes), "--experts", str(args.experts),
                        "--hidden", str(args.dim), "--iters", str(args.repeats), "--json", str(a2a_json)],
                       check=True, timeout=1800)
        d = json.loads(a2a_json.read_text())
        s = run_ranks(step_bench, args.ranks, Path(tmp) / "b", args.steps, 3,
                      ["parallel.tp=2", "parallel.ep=2"], str(Path(tmp) / "run"), timeout=1800)[0]
    print(f"\npart 2: tiny-cpu, {s['layout']}, ms per training step")
    phases = ("attention", "route", "dispatch_a2a", "experts", "combine_a2a", "fsdp_gather", "fsdp_reduce",
              "optimizer", "other", "step")
    print("| " + " | ".join(phases) + " |")
    print("|" + "---|" * len(phases))
    print("| " + " | ".join(f"{s['per_step'][f'time/{k}_ms']:.1f}" for k in phases) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"a2a": d, "step": s}, indent=1))


if __name__ == "__main__":
    main()
