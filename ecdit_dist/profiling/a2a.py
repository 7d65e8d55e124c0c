"""`ecdit profile a2a`: all-to-all bandwidth of the expert-parallel exchange.

Every rank of every ep group (consecutive ranks, as training lays them out; all groups run
at the same time) sends one buffer per size in two ways:

    raw    one dist.all_to_all_single of the whole buffer, equal chunks
    ecdit  the project's exchange: the dispatch and the combine hooks of
           ecdit_dist.parallel.ep (one all_to_all_single per local expert slot)

Both are checked for correct contents first, then timed after warm-up: CUDA events on GPU,
a barrier then the monotonic clock on CPU. A sample is one exchange (one direction). Per
size the row reports the median, p10 and p90 over samples of the slowest rank's time, and
the smallest / largest per-rank median. Bandwidths follow nccl-tests for all-to-all, with
n the ep group size:

    bytes_per_rank = everything one rank sends, its chunk to itself included
    algbw = bytes_per_rank / time        busbw = algbw * (n - 1) / n

Sizes come from a preset or config and its layout (what one EC dispatch of one MoE layer
sends per micro-batch: E experts x G groups x C tokens x d x dtype bytes), or from --sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = "64K,256K,1M,4M,16M"
DEFAULT_HIDDEN = 1024


# --------------------------------------------------------------------------- sizes

def parse_size(text: str) -> int:
    """'4M' -> 4 MiB in bytes (K, M, G are powers of 1024, as in nccl-tests)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 65536, 64K, 4M or 1G") from None
    if value < 1:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return int(value)


@dataclass
class DispatchShape:
    """One EC dispatch buffer of one rank: (num_experts, groups * capacity, hidden) of `dtype`."""
    num_experts: int
    tokens: int           # tokens this rank routes (micro-batch x kept tokens per image / tp)
    group_size: int
    capacity: int
    hidden: int
    element_bytes: int

    @property
    def rows_per_expert(self) -> int:
        return self.tokens // self.group_size * self.capacity

    @property
    def bytes_per_rank(self) -> int:
        return self.num_experts * self.rows_per_expert * self.hidden * self.element_bytes


def dispatch_shape(cfg, tp: int, micro_batch: int, element_bytes: int) -> DispatchShape:
    """The buffer one expert-choice dispatch sends, for a config, tp degree and micro-batch."""
    from ecdit_dist.config import ConfigError
    from ecdit_dist.model.moe import expert_capacity

    moe = cfg.moe
    if not moe.num_experts or moe.router != "expert_choice":
        raise ConfigError("ecdit profile a2a needs an expert-choice MoE model (moe.num_experts > 0, "
                          "moe.router=expert_choice); use --sizes for a plain sweep")
    tokens = micro_batch * cfg.model.train_tokens_per_image
    if tokens % tp or (tokens // tp) % moe.group_size:
        raise ConfigError(f"micro batch {micro_batch} x {cfg.model.train_tokens_per_image} tokens / tp {tp} "
                          f"= {tokens / tp:g} tokens is not a multiple of moe.group_size {moe.group_size}; "
                          f"choose another --micro-batch")
    return DispatchShape(moe.num_experts, tokens // tp, moe.group_size,
                         expert_capacity(moe.group_size, moe.capacity_factor, moe.num_experts),
                         cfg.model.hidden_dim, element_bytes)


def buffer_rows(nbytes: int, num_experts: int, hidden: int, element_bytes: int) -> int:
    """Rows per expert T so that (E, T, hidden) is the largest buffer <= nbytes (at least 1 row)."""
    return max(1, nbytes // (num_experts * hidden * element_bytes))


# --------------------------------------------------------------------------- timing

class _Clock:
    """Times one operation per call: CUDA events (read after the loop), or barrier + monotonic clock."""

    def __init__(self, device: torch.device, barrier) -> None:
        self.cuda = device.type == "cuda"
        self.barrier = barrier
        self.pending: list = []

    def time(self, fn) -> None:
        self.barrier()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((start, end))
        else:
            t0 = time.monotonic()
            fn()
            self.pending.append(time.monotonic() - t0)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            out = [s.elapsed_time(e) / 1000.0 for s, e in self.pending]
        else:
            out = list(self.pending)
        self.pending = []
        return out


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarise(per_rank: list[list[float]], bytes_per_rank: int, n: int, kind: str) -> dict:
    """Row of one size and kind from samples[rank][i] (sample i is the same exchange on every rank)."""
    slowest = [max(col) for col in zip(*per_rank)]
    t = statistics.median(slowest)
    algbw = bytes_per_rank / t / 1e9
    medians = [statistics.median(r) for r in per_rank]
    return {"kind": kind, "bytes_per_rank": bytes_per_rank, "time_s": t,
            "time_p10_s": _percentile(slowest, 0.1), "time_p90_s": _percentile(slowest, 0.9),
            "time_rank_min_s": min(medians), "time_rank_max_s": max(medians),
            "algbw_GBps": algbw, "busbw_GBps": algbw * (n - 1) / n, "samples": len(slowest)}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"all-to-all check failed: {what} received wrong data")


def measure_size(rows: int, num_experts: int, hidden: int, dtype: torch.dtype, group, n: int, device: torch.device,
                 warmup: int, iters: int) -> tuple[dict[str, list[float]], int]:
    """Check then time both kinds on an (E, rows, hidden) buffer; this rank's samples per kind."""
    import torch.distributed as dist

    from ecdit_dist.parallel.ep import _combine_hook, _dispatch_hook

    me = dist.get_rank(group) if n > 1 else 0
    E_local = num_experts // n
    # x[e_local * n + k] is the block for ep rank k, local expert slot e_local (the model's expert_order);
    # it holds a value naming its source rank and block (mod 251: exact in every dtype)
    block = torch.arange(num_experts, device=device, dtype=torch.float32)
    x = ((me * num_experts + block) % 251).view(num_experts, 1, 1).expand(num_experts, rows, hidden).to(dtype).contiguous()
    flat = x.view(-1, hidden)
    out = torch.empty_like(flat)

    if n > 1:
        def raw_forth():
            dist.all_to_all_single(out, flat, group=group)

        def raw_back():
            dist.all_to_all_single(flat, out, group=group)
        dispatch, combine = _dispatch_hook(group, n), _combine_hook(group, n)
    else:                                           # a degree of 1 communicates nothing: plain copies
        def raw_forth():
            out.copy_(flat)

        def raw_back():
            flat.copy_(out)
        dispatch = lambda m, a: (a[0].view(num_experts, rows, hidden),)        # noqa: E731
        combine = lambda m, a, o: o                                              # noqa: E731

    # contents: chunk j of the raw output comes from rank j; after dispatch, slot e chunk k holds rank k's
    # block (e * n + me); dispatch + combine returns the input
    raw_forth()
    chunk = out.view(n, -1, hidden)
    for j in range(n):
        expect = j * num_experts + torch.arange(me * num_experts // n, (me + 1) * num_experts // n,
                                                device=device).repeat_interleave(rows)
        _check(torch.equal(chunk[j, :, 0].float(), (expect % 251).float()), f"raw all_to_all_single chunk {j}")
    raw_back()
    with torch.no_grad():
        local = dispatch(None, (x,))[0]             # (E_local, n * rows, hidden)
        got = local.view(E_local, n, rows, hidden)[..., 0, 0].float()
        expect = (torch.arange(n, device=device).view(1, n) * num_experts
                  + torch.arange(E_local, device=device).view(E_local, 1) * n + me) % 251
        expect = expect.float()
        _check(torch.equal(got, expect), "ecdit dispatch")
        back = combine(None, None, local)
        _check(torch.equal(back, x), "ecdit dispatch + combine round trip")

    barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
    clock = _Clock(device, barrier)
    samples: dict[str, list[float]] = {"raw": [], "ecdit": []}
    state: dict = {}

    def ecdit_dispatch():
        state["local"] = dispatch(None, (x,))[0]

    def ecdit_combine():
        combine(None, None, state.pop("local"))

    with torch.no_grad():
        for i in range(warmup + iters):
            for kind, ops in (("raw", (raw_forth, raw_back)), ("ecdit", (ecdit_dispatch, ecdit_combine))):
                for op in ops:
                    clock.time(op)
                got = clock.seconds()
                if i >= warmup:
                    samples[kind].extend(got)
    return samples, x.numel() * x.element_size()


# --------------------------------------------------------------------------- command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ecdit profile a2a",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  ecdit profile a2a --nproc 4 --ep 2 --preset tiny --iters 20\n"
               "  ecdit profile a2a --nproc 8 --ep 8 --preset ecdit-xl-8e --dtype bf16 --json a2a.json --plot a2a.png\n"
               "  torchrun --nnodes 2 --nproc_per_node 8 ... -m ecdit_dist.profiling.a2a --ep 16 --sizes 1M,16M,256M\n")
    p.add_argument("--nproc", type=int, default=None, help="start this many ranks on this machine through torchrun")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel group size n (default: the config's parallel.ep, else the world size)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="architecture preset whose dispatch buffer sets the size")
    src.add_argument("--config", help="run config whose model and layout set the size")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: the config's parallel.tp)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="images per rank per forward (default: train.micro_batch_size, else the per-rank batch)")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated bytes per rank, e.g. 1M,4M,16M (default without a model: {DEFAULT_SIZES})")
    p.add_argument("--experts", type=int, default=None,
                   help="experts per MoE layer for a --sizes sweep (default: the model's, else n)")
    p.add_argument("--hidden", type=int, default=None,
                   help=f"row width for a --sizes sweep (default: the model's hidden size, else {DEFAULT_HIDDEN})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="element type (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size (each gives 2 samples)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per size first")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--plot", default=None, help="write busbw against size as a PNG to this file")
    return p


def _model_config(args):
    from ecdit_dist.config import config_from_dict, load_config

    if args.config:
        return load_config(args.config, args.set)
    if args.preset:
        return config_from_dict({"model": {"preset": args.preset}}, validate=False)
    return None


def plan(args, world: int, element_bytes: int) -> dict:
    """Everything decided before any collective: group size, experts, hidden, sizes (validated)."""
    from ecdit_dist.config import ConfigError

    cfg = _model_config(args)
    n = args.ep or (cfg.parallel.ep if cfg is not None and cfg.parallel.ep > 1 else world)
    if n < 1 or world % n:
        raise ConfigError(f"--ep {n} must divide the number of ranks {world}; valid: "
                          f"{[d for d in range(1, world + 1) if world % d == 0]}")
    if args.iters < 1 or args.warmup < 0:
        raise ConfigError("--iters must be >= 1 and --warmup >= 0")
    info: dict = {"group_size": n, "world": world}
    if cfg is not None:
        E, hidden = cfg.moe.num_experts, cfg.model.hidden_dim
        if E and E % n:
            raise ConfigError(f"--ep {n} must divide the {E} experts of the model; valid: "
                              f"{[d for d in range(1, E + 1) if E % d == 0]}")
    else:
        E, hidden = n, DEFAULT_HIDDEN
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        E, hidden = args.experts or E or n, args.hidden or hidden
        if E % n or hidden < 1:
            raise ConfigError(f"--experts {E} must be a multiple of --ep {n} and --hidden >= 1")
    elif cfg is not None:
        tp = args.tp or cfg.parallel.tp
        dp = max(1, world // tp)
        per_rank = max(1, cfg.train.global_batch_size // dp)
        micro = args.micro_batch or cfg.train.micro_batch_size or per_rank
        shape = dispatch_shape(cfg, tp, micro, element_bytes)
        info["dispatch"] = {"num_experts": shape.num_experts, "tokens": shape.tokens, "group_size": shape.group_size,
                            "capacity": shape.capacity, "hidden": shape.hidden, "micro_batch": micro, "tp": tp,
                            "rows_per_expert": shape.rows_per_expert, "bytes_per_rank": shape.bytes_per_rank}
        sizes = [shape.bytes_per_rank]
    else:
        sizes = [parse_size(s) for s in DEFAULT_SIZES.split(",")]
    info.update(num_experts=E, hidden=hidden, sizes=sizes)
    return info


def format_table(result: dict) -> str:
    lines = [f"# all-to-all: {result['world']} ranks, {result['world'] // result['group_size']} concurrent ep groups "
             f"of n = {result['group_size']}, {result['dtype']}, {result['backend']}, {result['iters']} iterations "
             f"x 2 exchanges after {result['warmup']} warm-up",
             "# busbw = algbw * (n-1)/n; time = median over samples of the slowest rank (p10, p90); "
             "rank min/max = per-rank medians",
             f"{'bytes/rank':>12s} {'kind':>6s} {'time us':>10s} {'p10 us':>10s} {'p90 us':>10s} {'rank min':>10s} "
             f"{'rank max':>10s} {'algbw GB/s':>11s} {'busbw GB/s':>11s}"]
    for r in result["rows"]:
        lines.append(f"{r['bytes_per_rank']:12d} {r['kind']:>6s} {r['time_s'] * 1e6:10.1f} {r['time_p10_s'] * 1e6:10.1f} "
                     f"{r['time_p90_s'] * 1e6:10.1f} {r['time_rank_min_s'] * 1e6:10.1f} "
                     f"{r['time_rank_max_s'] * 1e6:10.1f} {r['algbw_GBps']:11.3f} {r['busbw_GBps']:11.3f}")
    by_size: dict[int, dict[str, float]] = {}
    for r in result["rows"]:
        by_size.setdefault(r["bytes_per_rank"], {})[r["kind"]] = r["time_s"]
    ratios = [f"{b}: {t['raw'] / t['ecdit']:.3f}" for b, t in by_size.items() if "raw" in t and "ecdit" in t]
    lines.append("# raw time / ecdit time per size (1.0 = the exchange costs nothing over the raw collective): "
                 + ", ".join(ratios))
    return "\n".join(lines)


def write_outputs(result: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    if plot_path:
        from ecdit_dist.profiling.plot import line_chart

        series: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            series.setdefault(r["kind"], []).append((r["bytes_per_rank"], r["busbw_GBps"]))
        line_chart(series, plot_path,
                   f"all-to-all busbw, {result['world']} ranks, ep groups of {result['group_size']}, "
                   f"{result['dtype']}, {result['backend']}", "bytes per rank", "busbw GB/s")


def run(args) -> dict | None:
    """The measurement on this rank (inside a process group of any size, or alone)."""
    import torch.distributed as dist

    from ecdit_dist.train import launch_env

    rank, world, local_rank = launch_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    element_bytes = torch.empty((), dtype=dtype).element_size()
    info = plan(args, world, element_bytes)                 # every check before the first collective
    n = info["group_size"]
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    group = None
    if n > 1:
        group, _ = dist.new_subgroups(group_size=n)          # consecutive ranks, as the expert mesh lays them out
    ok = False
    try:
        rows = []
        for i, nbytes in enumerate(info["sizes"]):
            T = buffer_rows(nbytes, info["num_experts"], info["hidden"], element_bytes)
            samples, sent = measure_size(T, info["num_experts"], info["hidden"], dtype, group, n, device,
                                         args.warmup, args.iters)
            gathered = [samples]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, samples)
            if rank == 0:
                for kind in ("raw", "ecdit"):
                    rows.append(summarise([g[kind] for g in gathered], sent, n, kind))
                print(f"size {i + 1}/{len(info['sizes'])}: {sent} bytes per rank", file=sys.stderr, flush=True)
        ok = True
        if rank != 0:
            return None
        backend = dist.get_backend() if world > 1 else "none"
        return {**{k: info[k] for k in ("group_size", "world")}, "groups": world // n, "backend": backend,
                "device": device.type, "dtype": args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
                "num_experts": info["num_experts"], "hidden": info["hidden"], "iters": args.iters,
                "warmup": args.warmup, "source": args.preset or args.config or "sizes",
                **({"dispatch": info["dispatch"]} if "dispatch" in info else {}), "rows": rows}
    finally:
        if world > 1 and dist.is_initialized():
            if ok:                                          # after a failure the other ranks may never arrive
                dist.barrier()
            dist.destroy_process_group()


def relaunch(argv: list[str], nproc: int, module: str) -> None:
    """Replace this process by torchrun starting `nproc` local ranks of `module` (argv without --nproc)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *rest]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> int:
    from ecdit_dist.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            dtype = DTYPES[args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")]
            plan(args, args.nproc, torch.empty((), dtype=dtype).element_size())    # fail here, not in every rank
            relaunch(argv, args.nproc, "ecdit_dist.profiling.a2a")
        result = run(args)
    except (ConfigError, ValueError) as e:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank is not None else ''}: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(format_table(result), flush=True)
        write_outputs(result, args.json, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
