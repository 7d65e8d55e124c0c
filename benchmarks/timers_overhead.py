"""Cost of the per-phase step timers (logging.timers): the same training steps with and without.

    python benchmarks/timers_overhead.py                 # 1 rank, then 4 ranks (tp 2, ep 2, dp_shard 2)
    python benchmarks/timers_overhead.py --ranks 4 --steps 20 --json out.json

Two trainers of configs/tiny-cpu.yaml live in the same processes, one with timers on and
one off; their steps are interleaved (on, off, off, on, on, off, ...) after warm-up, each between
barriers, and the timed side also collects its metrics every step (the worst case: a
metrics line per step). Reported: median step time of each and their ratio, and the cost
in isolation: clock marks per step times the host time of one mark (a start/stop pair
timed 10000 times), as a share of the step, which is what the ratio cannot resolve on a
noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overhead(rank: int, world: int, steps: int, warmup: int, overrides: list[str], run_dir: str,
             control: bool = False) -> dict:
    import torch.distributed as dist

    from ecdit_dist.config import load_config
    from ecdit_dist.profiling.phases import PhaseTimer
    from ecdit_dist.train import Trainer

    def make(name: str, timers: bool) -> Trainer:
        return Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", [
            *overrides, f"run.dir={run_dir}/{name}", f"logging.timers={str(timers).lower()}",
            "logging.progress=false", "logging.tensorboard=false", "sample.at_end=false", "checkpoint.resume=false"]))

    on, off = make("on", not control), make("off", False)
    barrier = dist.barrier if world > 1 else (lambda: None)
    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for s in range(warmup + steps):
            pair = (("on", on), ("off", off))
            for name, tr in (pair if s % 2 == 0 else pair[::-1]):     # alternate who goes first
                barrier()
                t0 = time.perf_counter()
                tr.profiler.begin(s)
                tr.train_step(s)
                tr.profiler.end(s)
                tr.profiler.metrics()
                barrier()
                if s >= warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        # the cost in isolation: clock marks per step, and the host time of one start/stop pair
        on.profiler.begin(warmup + steps)
        on.train_step(warmup + steps)
        marks = len(on.profiler.timer._marks) + 1
        on.profiler.end(warmup + steps)
        on.profiler.metrics()
        t = PhaseTimer(on.device)
        t.begin_step()
        t0 = time.perf_counter()
        for i in range(10000):
            t.start("attention", i)
            t.stop("attention", i)
        pair = (time.perf_counter() - t0) / 10000
        t.end_step()
        return {"layout": on.dims.describe(), "median_s": med, "on_over_off": med["on"] / med["off"],
                "marks_per_step": marks, "seconds_per_mark": pair / 2,
                "marks_share_of_step": marks * pair / 2 / med["off"]}
    finally:
        off.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--control", action="store_true",
                   help="A/A run: both trainers with timers off, to see the noise floor of the ratio")
    p.add_argument("--json")
    args = p.parse_args()

    from ecdit_dist.parallel.local import run_ranks

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            overrides = ["parallel.tp=2", "parallel.ep=2"] if world == 4 else []
            r = run_ranks(overhead, world, Path(tmp) / f"w{world}", args.steps, args.warmup, overrides,
                          str(Path(tmp) / f"run{world}"), args.control, timeout=1800)[0]
            results.append(r)
            print(f"{'A/A control, ' if args.control else ''}{r['layout']}: timers on {r['median_s']['on'] * 1000:.1f} ms, off "
                  f"{r['median_s']['off'] * 1000:.1f} ms per step, on / off = {r['on_over_off']:.4f}; "
                  f"{r['marks_per_step']} clock marks per step x {r['seconds_per_mark'] * 1e6:.2f} us = "
                  f"{100 * r['marks_share_of_step']:.3f}% of the step", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
