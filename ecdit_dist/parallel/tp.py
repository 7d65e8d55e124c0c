"""Tensor parallelism: Megatron-style column/row splits as DTensor plans, keyed by module path.

In every block the q/k/v projections of self- and cross-attention and the first FFN
matrix are split by columns (each rank holds num_heads/tp query heads, num_kv_heads/tp
key/value heads, d_ff/tp hidden units) and the output projections by rows (one
all-reduce per sub-layer); activations between sub-layers are replicated over tp.

A MoE layer is not split by weights: its tokens are. Each tp rank routes and dispatches
its contiguous 1/tp share of the tokens and the outputs are gathered again; the router,
which then sees only part of the tokens on each rank, gets its gradient summed over tp
after the backward pass (`sum_router_grads_over_tp`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ecdit_dist.parallel.ac import reuse_in_recompute

ATTENTION_PLAN = {
    "attn.q_proj": ColwiseParallel, "attn.k_proj": ColwiseParallel, "attn.v_proj": ColwiseParallel,
    "attn.o_proj": RowwiseParallel,
    "cross_attn.q_proj": ColwiseParallel, "cross_attn.k_proj": ColwiseParallel,
    "cross_attn.v_proj": ColwiseParallel, "cross_attn.o_proj": RowwiseParallel,
}
DENSE_FFN_PLAN = {"ffn.w1": ColwiseParallel, "ffn.w2": RowwiseParallel}


def block_plan(is_moe: bool) -> dict:
    plan = dict(ATTENTION_PLAN)
    if not is_moe:
        plan.update(DENSE_FFN_PLAN)
    return {path: style() for path, style in plan.items()}


def _gather_rows(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """All-gather along dim 0 straight into one output tensor (no list of parts, no cat)."""
    x = x.contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


class _SplitTokens(torch.autograd.Function):
    """Forward: keep this rank's contiguous share of the tokens. Backward: all-gather the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        return x.chunk(size, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_rows(grad, ctx.group, ctx.size), None, None, None


class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather the shares. Backward: keep this rank's share of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
        ctx.rank, ctx.size = rank, size
        return reuse_in_recompute(_gather_rows, x, group, size)     # not repeated in a recompute

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.size, dim=0)[ctx.rank].contiguous(), None, None, None


def split_moe_tokens_over_tp(layer: nn.Module, group) -> None:
    """Make `layer` (B, S, d) -> (B, S, d) route only this tp rank's share of the tokens."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    shapes: list[torch.Size] = []

    def pre(module, args):
        x = args[0]
        shapes.append(x.shape)
        local = _SplitTokens.apply(x.reshape(-1, x.shape[-1]), group, rank, size)   # (N/tp, d)
        return (local.unsqueeze(0),) + tuple(args[1:])

    def post(module, args, out):
        full = _GatherTokens.apply(out.reshape(-1, out.shape[-1]), group, rank, size)  # (N, d)
        return full.view(shapes.pop())

    layer.register_forward_pre_hook(pre)
    layer.register_forward_hook(post)


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    tp_group = tp_mesh.get_group()
    for block in model.blocks:
        parallelize_module(block, tp_mesh, block_plan(block.is_moe))
        if block.is_moe:
            split_moe_tokens_over_tp(block.ffn, tp_group)


def sum_router_grads_over_tp(model: nn.Module, tp_group) -> None:
    """Each tp rank's router saw only its tokens: add the partial gradients."""
    for layer in model.moe_layers():
        g = layer.router.weight.grad
        if g is not None:
            local = g.to_local() if hasattr(g, "to_local") else g
            dist.all_reduce(local, group=tp_group)
