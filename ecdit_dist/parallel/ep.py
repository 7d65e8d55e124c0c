"""Expert parallelism: each rank of an ep group owns num_experts / ep experts.

Expert choice gives every expert exactly C tokens per group, and token choice a fixed number
of slots (empty ones carry gate 0), so the dispatch buffer (E, T, d) splits into equal
chunks: the MoE layer gathers it in `expert_order` (local slot, destination), the
all-to-all (one call per local expert slot, autograd-aware, no count exchange, no host
sync) delivers to each owner its experts' tokens from all ep ranks as the
(E/ep, ep*T, d) input of one batched matmul, and the same exchange returns the results.
Neither side copies or reshuffles the buffer. `parallel.ep_exchange=single` instead sends the
buffer in natural expert order with one all_to_all_single per direction and one permute copy
(on the receiving side of dispatch, on the sending side of combine): fewer, larger calls,
which is what NCCL prefers. Under activation checkpointing the recompute reuses the forward's
exchange outputs (`parallel.ac`): no exchange runs twice.

Gradient bookkeeping: the all-to-all backward already sums an expert's gradient over the
ep ranks whose tokens it processed, and FSDP then averages it over the expert-data-parallel
ranks. Relative to the data-parallel mean that is a factor ep / tp too large (tp because
tensor-parallel ranks route disjoint token shares); `scale_expert_grads` undoes it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Shard, distribute_tensor

from ecdit_dist.parallel.ac import reuse_in_recompute


def shard_experts(experts: nn.Module, ep_mesh) -> None:
    """Replace w1/w2 (E, ...) by DTensors sharded along E over the ep mesh (every rank keeps E/ep)."""
    for name in ("w1", "w2"):
        p = getattr(experts, name)
        setattr(experts, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))


class _ExpertExchange(torch.autograd.Function):
    """(E_local, ep * T, d) -> (E_local, ep * T, d): for every local expert slot e, chunk k of row e
    goes to ep rank k and chunk j of the result comes from ep rank j. One all_to_all_single per
    local expert, reading and writing contiguous rows: no reshuffling copies on either side."""

    @staticmethod
    def _exchange(x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        for e in range(x.shape[0]):
            dist.all_to_all_single(out[e], x[e], group=group)
        return out

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return reuse_in_recompute(_ExpertExchange._exchange, x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ExpertExchange._exchange(grad, ctx.group), None


def _single_to_experts(x: torch.Tensor, group, ep: int) -> torch.Tensor:
    """(E, T, d) in natural order (destination k, slot e) -> one all_to_all_single -> (source j,
    slot e, T, d) -> one permute copy -> (E_local, ep * T, d), source-major per expert."""
    E, T, d = x.shape
    recv = torch.empty_like(x)
    dist.all_to_all_single(recv, x.contiguous(), group=group)
    return recv.view(ep, E // ep, T, d).transpose(0, 1).contiguous().view(E // ep, ep * T, d)


def _single_from_experts(y: torch.Tensor, group, ep: int) -> torch.Tensor:
    """(E_local, ep * T, d) -> one permute copy -> (destination j, slot e, T, d) -> one
    all_to_all_single -> (owner k, slot e, T, d) = (E, T, d) in natural order."""
    E_local, epT, d = y.shape
    send = y.view(E_local, ep, epT // ep, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(E_local * ep, epT // ep, d)


class _SingleDispatch(torch.autograd.Function):
    """Dispatch with one all_to_all_single; its backward is the combine exchange, and vice versa."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, ep: int) -> torch.Tensor:
        ctx.group, ctx.ep = group, ep
        return reuse_in_recompute(_single_to_experts, x, group, ep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _single_from_experts(grad, ctx.group, ctx.ep), None, None


class _SingleCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, group, ep: int) -> torch.Tensor:
        ctx.group, ctx.ep = group, ep
        return reuse_in_recompute(_single_from_experts, y, group, ep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _single_to_experts(grad, ctx.group, ctx.ep), None, None


EXCHANGES = ("per_expert", "single")


def resolve_exchange(exchange: str, group) -> str:
    """parallel.ep_exchange: auto = single on nccl (fewer, larger calls), per_expert elsewhere
    (gloo on CPU: measured in benchmarks/alltoall_dispatch.py, docs/PERFORMANCE.md)."""
    if exchange == "auto":
        return "single" if dist.get_backend(group) == "nccl" else "per_expert"
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown parallel.ep_exchange {exchange!r}; choose auto, per_expert or single")
    return exchange


def expert_order(num_experts: int, ep: int) -> torch.Tensor:
    """Dispatch order (local slot e, destination k) -> global expert k * E_local + e.

    In this order the tokens of local slot e for every destination are one contiguous block,
    and what a rank receives for slot e is exactly the (ep * T, d) input of its expert e."""
    e_local = num_experts // ep
    return torch.tensor([k * e_local + e for e in range(e_local) for k in range(ep)])


def _dispatch_hook(group, ep: int, exchange: str = "per_expert"):
    def hook(module, args):
        x = args[0]                                                   # (E, T, d) in expert_order
        if exchange == "single":                                      # (E, T, d) in natural order
            return (_SingleDispatch.apply(x, group, ep),)             # (E_local, ep*T, d)
        E, T, d = x.shape
        return (_ExpertExchange.apply(x.view(E // ep, ep * T, d), group),)   # (E_local, ep*T, d)
    hook.profile_phase = "dispatch_a2a"                               # named by ecdit_dist.profiling timers
    return hook


def _combine_hook(group, ep: int, exchange: str = "per_expert"):
    def hook(module, args, out):
        E_local, epT, d = out.shape                                   # (E_local, ep*T, d)
        if exchange == "single":
            return _SingleCombine.apply(out, group, ep)               # (E, T, d) natural order
        return _ExpertExchange.apply(out, group).view(E_local * ep, epT // ep, d)  # (E, T, d)
    hook.profile_phase = "combine_a2a"
    return hook


def apply_expert_parallel(model: nn.Module, ep_mesh, exchange: str = "auto") -> None:
    group = ep_mesh.get_group()
    ep = ep_mesh.size()
    exchange = resolve_exchange(exchange, group)
    for layer in model.moe_layers():
        shard_experts(layer.experts, ep_mesh)
        layer.expert_order = expert_order(layer.num_experts, ep) if exchange == "per_expert" else None
        layer.experts.register_forward_pre_hook(_dispatch_hook(group, ep, exchange))
        layer.experts.register_forward_hook(_combine_hook(group, ep, exchange))


def scale_expert_grads(model: nn.Module, factor: float) -> None:
    if factor == 1.0:
        return
    for layer in model.moe_layers():
        for p in layer.experts.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
