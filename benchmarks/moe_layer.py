"""Expert-choice MoE layer speed: forward + backward, and each of its GEMMs, as ratios
measured in one run against a dense FFN doing the same FLOPs.

Part 1, the layer (forward + backward), contenders on the same tokens:
  dense    - one FFN applied to capacity_factor x tokens (the same expert FLOPs, no routing)
  ec       - ExpertChoiceMoE with the expert GEMM plan chosen at first use (moe.expert_gemm=auto;
             the plan and the time the choice took are printed)
  ec[bmm]  - the same layer forced to plain bmm (the form before the selector), when auto differs
  onehot   - the one-hot einsum dispatch/combine of the paper's Algorithm 1

Part 2, the six GEMMs of the experts (forward, input gradient, weight gradient of w1 and w2),
each in every candidate form and as the dense counterpart: one mm of the same FLOPs and the same
operand transposition with E x T rows. A ratio well above 1 names the GEMM and form that lose.

Contenders are interleaved (dense, ec, ..., dense, ...) and medians kept, so drift of a busy
machine affects all alike; every figure is printed with the CPU, cores, torch build, BLAS and
load average it was measured under. Usage:

    python benchmarks/moe_layer.py                       # E = 8 and 64, d=512, d_ff=2048, fp32 (+ bf16 if native)
    python benchmarks/moe_layer.py --experts 8 --dtype fp32 bf16 --repeats 3 --json out.json
    python benchmarks/moe_layer.py --host-memory release    # the C library's default allocator behaviour

The host allocator is set as training sets it (train.host_memory, default auto = reuse freed large
blocks on CPU): without that, every large tensor of every step is faulted in afresh, which costs the
experts' weight gradients (E x d x d_ff each) far more than the dense FFN's (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine_info  # noqa: E402

from ecdit_dist.device import keep_host_memory  # noqa: E402
from ecdit_dist.model import expert_gemm  # noqa: E402
from ecdit_dist.model.expert_gemm import ROLES, batched_mm, candidates, plan_for  # noqa: E402
from ecdit_dist.model.moe import ExpertChoiceMoE, FeedForward, expert_capacity  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
class OneHotMoE(torch.nn.Module):
    """Algorithm 1: one-hot dispatch tensor and einsums (experts batched for fairness)."""

    def __init__(self, ec: ExpertChoiceMoE) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ec = self.ec
        d = x.shape[-1]
        g = ec.group_size
        xp = x.reshape(-1, g, d)                                              # (G, g, d)
        C = expert_capacity(g, ec.capacity_factor, ec.num_experts)
        affinity = torch.softmax(torch.einsum("bsd,ed->bse", xp, ec.router.weight), dim=-1)
        gating, index = affinity.transpose(1, 2).topk(C, dim=-1)             # (G, E, C)
        dispatch = F.one_hot(index, num_classes=g).to(x.dtype)               # (G, E, C, g)
        x_in = torch.einsum("becs,bsd->becd", dispatch, xp)                  # (G, E, C, d)
        G, E = x_in.shape[:2]
        x_e = x_in.transpose(0, 1).reshape(E, G * C, d)
        y = ec.experts(x_e).view(E, G, C, d).transpose(0, 1)                # (G, E, C, d)
        out = torch.einsum("becs,bec,becd->bsd", dispatch, gating.to(x.dtype), y)
        return out.reshape(x.shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    _sync(x.device)
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(torch.ones_like(out))
    _sync(x.device)
    return time.perf_counter() - t0


def bench_layer(experts: int, tokens: int, dim: int, ffn: int, group: int, cf: float, repeats: int, warmup: int,
                dtype: torch.dtype, device: torch.device) -> dict:
    torch.manual_seed(0)
    ec = ExpertChoiceMoE(dim, ffn, experts, cf, group).to(device, dtype)
    dense = FeedForward(dim, ffn).to(device, dtype)
    onehot = OneHotMoE(ec)
    copies = int(cf)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    C = expert_capacity(group, cf, experts)
    T = tokens // group * C
    t0 = time.perf_counter()
    plan = plan_for(experts, T, dim, ffn, dtype, device)             # the measurement at first use
    select_s = time.perf_counter() - t0

    def ec_forced(t):
        ec.experts.gemm = "bmm"
        try:
            return ec(t)
        finally:
            ec.experts.gemm = "auto"

    contenders = {"dense": lambda t: dense(t.repeat(1, copies, 1)), "ec": ec}
    if plan != expert_gemm.GemmPlan.forced("bmm"):
        contenders["ec[bmm]"] = ec_forced
    contenders["onehot"] = onehot
    print(f"  {experts} experts, {dtype}: plan chosen in {select_s:.1f} s; timing {warmup} + {repeats} rounds of "
          f"{', '.join(contenders)}", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(warmup + repeats):
        print(f"  round {i + 1}/{warmup + repeats}", file=sys.stderr, flush=True)
        for name, fn in contenders.items():
            for p in list(ec.parameters()) + list(dense.parameters()):
                p.grad = None
            dt = _time(fn, x)
            if i >= warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "experts": experts, "tokens": tokens, "dim": dim, "ffn_dim": ffn, "group_size": group, "dtype": str(dtype),
        "capacity_factor": cf, "capacity": C, "tokens_per_expert": T,
        "plan": {r: getattr(plan, r) for r in ROLES}, "selection_s": select_s,
        "selection_timings_s": expert_gemm.chosen().get((experts, T, dim, ffn, dtype, str(device), False), (None, None))[1],
        "seconds": med, "ratio_to_dense": {k: v / med["dense"] for k, v in med.items()},
    }


# (role, name, expert operand shapes as in ExpertFFN, transposition of each operand)
GEMMS = [
    ("fwd", "w1 forward      z = x @ w1", lambda E, T, d, f: ((E, T, d), (E, d, f)), (False, False)),
    ("fwd", "w2 forward      y = h @ w2", lambda E, T, d, f: ((E, T, f), (E, f, d)), (False, False)),
    ("dgrad", "w2 input grad  dh = dy @ w2^T", lambda E, T, d, f: ((E, T, d), (E, f, d)), (False, True)),
    ("wgrad", "w2 weight grad dw2 = h^T @ dy", lambda E, T, d, f: ((E, T, f), (E, T, d)), (True, False)),
    ("dgrad", "w1 input grad  dx = dz @ w1^T", lambda E, T, d, f: ((E, T, f), (E, d, f)), (False, True)),
    ("wgrad", "w1 weight grad dw1 = x^T @ dz", lambda E, T, d, f: ((E, T, d), (E, T, f)), (True, False)),
]


def _operand(shape, transposed: bool, dtype, device) -> torch.Tensor:
    t = torch.randn(*shape, dtype=dtype, device=device)
    return t.transpose(-2, -1) if transposed else t


def bench_gemms(experts: int, T: int, dim: int, ffn: int, plan: dict, repeats: int,
                dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Every expert GEMM in every candidate form against its dense counterpart (E*T rows, one mm)."""
    rows = []
    print(f"  {experts} experts, {dtype}: timing the six GEMMs in every form", file=sys.stderr, flush=True)
    for role, name, shapes, trans in GEMMS:
        sa, sb = shapes(experts, T, dim, ffn)
        a, b = _operand(sa, trans[0], dtype, device), _operand(sb, trans[1], dtype, device)
        # dense: the same operand roles with E x T rows (or the reduction over E x T tokens) in one mm
        # the first operand is always (E, T, .) activations; the second only for weight gradients
        da_shape = (sa[0] * sa[1], sa[2])
        db_shape = (sb[0] * sb[1], sb[2]) if role == "wgrad" else sb[1:]
        da, db = _operand(da_shape, trans[0], dtype, device), _operand(db_shape, trans[1], dtype, device)
        fns = {f"expert {f}": (lambda f=f: batched_mm(a, b, f)) for f in candidates(role, device, dtype)}
        fns["dense mm"] = lambda: torch.mm(da, db)
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.no_grad():
            for i in range(repeats + 1):
                for k, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    if i:
                        times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        chosen = f"expert {plan[role]}"
        rows.append({"gemm": name, "role": role, "chosen": plan[role], "seconds": med,
                     "chosen_over_dense": med[chosen] / med["dense mm"],
                     "gflop": 2 * experts * T * dim * ffn / 1e9})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--group", type=int, default=1024)
    p.add_argument("--capacity-factor", type=float, default=2.0)
    p.add_argument("--dtype", nargs="+", default=["auto"], choices=["auto", *DTYPES],
                   help="auto = fp32, plus bf16 where the CPU has native bf16 (avx512_bf16 / AMX) or on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7, help="timed layer repeats (median kept)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemm-repeats", type=int, default=3, help="timed repeats per GEMM (median kept); 0 skips part 2")
    p.add_argument("--host-memory", default="auto", choices=["auto", "reuse", "release"],
                   help="large freed host blocks, as train.host_memory: auto = reuse on CPU (what training does)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    host_memory = keep_host_memory(args.host_memory, device.type)
    info = {**machine_info(), "host_memory": host_memory}
    names = args.dtype
    if "auto" in names:
        names = ["fp32"] + (["bf16"] if info["native_bf16"] or device.type == "cuda" else [])
    print(f"machine: {describe(info)}; host memory: {host_memory}")
    if "bf16" not in names:
        print("bf16: not measured (no native bf16 on this CPU: no avx512_bf16 / amx_bf16 flag); --dtype bf16 forces it")
    print(f"shapes: d={args.dim}, d_ff={args.ffn}, group {args.group}, {args.tokens} tokens, "
          f"capacity factor {args.capacity_factor}; device {device}\n", flush=True)
    results = []
    for name in names:
        dtype = DTYPES[name]
        for e in args.experts:
            r = bench_layer(e, args.tokens, args.dim, args.ffn, args.group, args.capacity_factor, args.repeats,
                            args.warmup, dtype, device)
            r["machine"] = {**info, "loadavg_1m_end": machine_info()["loadavg_1m"]}
            results.append(r)
            s, q = r["seconds"], r["ratio_to_dense"]
            print(f"## {name}, E = {e}: C = {r['capacity']}, {r['tokens_per_expert']} tokens per expert; plan "
                  f"fwd={r['plan']['fwd']} dgrad={r['plan']['dgrad']} wgrad={r['plan']['wgrad']} "
                  f"(chosen in {r['selection_s']:.1f} s); load average {info['loadavg_1m']} -> "
                  f"{r['machine']['loadavg_1m_end']}")
            print("| layer fwd+bwd | " + " | ".join(s) + " |")
            print("|---|" + "---|" * len(s))
            print("| seconds | " + " | ".join(f"{v:.3f}" for v in s.values()) + " |")
            print("| / dense | " + " | ".join(f"{v:.3f}" for v in q.values()) + " |", flush=True)
            r["gemms"] = (bench_gemms(e, r["tokens_per_expert"], args.dim, args.ffn, r["plan"], args.gemm_repeats,
                                      dtype, device) if args.gemm_repeats else [])
            if r["gemms"]:
                forms = list(r["gemms"][2]["seconds"])            # dgrad: the most forms
                print(f"\n| GEMM (ms, median of {args.gemm_repeats}) | GFLOP | " + " | ".join(forms) +
                      " | chosen | chosen / dense |")
                print("|---|---|" + "---|" * (len(forms) + 2))
                for g in r["gemms"]:
                    cells = [f"{1000 * g['seconds'][k]:.1f}" if k in g["seconds"] else "-" for k in forms]
                    print(f"| {g['gemm']} | {g['gflop']:.1f} | " + " | ".join(cells) +
                          f" | {g['chosen']} | {g['chosen_over_dense']:.3f} |")
            print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
