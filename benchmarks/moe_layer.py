"""Expert-choice MoE layer speed: forward + backward, as ratios measured in one run.

Three contenders on the same tokens:
  dense  - one FFN applied to capacity_factor x tokens (the same expert FLOPs, no routing)
  ec     - ExpertChoiceMoE (gather dispatch, batched-matmul experts, scatter-add combine)
  onehot - the one-hot einsum dispatch/combine of the paper's Algorithm 1

Timings are interleaved (dense, ec, onehot, dense, ...) and the median of each is kept,
so drift of the machine affects all three alike. Usage:

    python benchmarks/moe_layer.py                       # E = 8 and 64, d=512, d_ff=2048
    python benchmarks/moe_layer.py --experts 8 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ecdit_dist.model.moe import ExpertChoiceMoE, FeedForward, expert_capacity


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


def _time(fn, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def bench(experts: int, tokens: int, dim: int, ffn: int, group: int, cf: float, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    ec = ExpertChoiceMoE(dim, ffn, experts, cf, group)
    onehot = OneHotMoE(ec)
    dense = FeedForward(dim, ffn)
    copies = int(cf)
    x = torch.randn(1, tokens, dim)
    contenders = {
        "dense": lambda t: dense(t.repeat(1, copies, 1)),
        "ec": ec,
        "onehot": onehot,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(warmup + repeats):
        for name, fn in contenders.items():
            for p in list(ec.parameters()) + list(dense.parameters()):
                p.grad = None
            dt = _time(fn, x)
            if i >= warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "experts": experts, "tokens": tokens, "dim": dim, "ffn_dim": ffn, "group_size": group,
        "capacity_factor": cf, "capacity": expert_capacity(group, cf, experts), "threads": torch.get_num_threads(),
        "seconds": med, "ec_over_dense": med["ec"] / med["dense"], "onehot_over_dense": med["onehot"] / med["dense"],
        "onehot_over_ec": med["onehot"] / med["ec"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--group", type=int, default=1024)
    p.add_argument("--capacity-factor", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = [bench(e, args.tokens, args.dim, args.ffn, args.group, args.capacity_factor, args.repeats, args.warmup)
               for e in args.experts]
    print("| E | C | dense s | EC s | one-hot s | EC / dense | one-hot / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        print(f"| {r['experts']} | {r['capacity']} | {s['dense']:.3f} | {s['ec']:.3f} | {s['onehot']:.3f} | "
              f"{r['ec_over_dense']:.3f} | {r['onehot_over_dense']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
