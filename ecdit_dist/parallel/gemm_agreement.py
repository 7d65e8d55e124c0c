"""Make every rank choose the same expert GEMM plan.

`ecdit_dist.model.expert_gemm` times the candidate GEMM forms at first use. In a distributed
model the timings are summed over all ranks before the fastest form is taken, so every rank
runs the same plan. Only the expert modules of the parallelized model carry the all-reduce: a
plain model that one rank builds for itself (e.g. to sample) decides locally, alone. The sum is one all-reduce of a few numbers per new expert shape; it is
issued at the experts' first call with that shape, which happens on every rank at the same
point because expert choice gives every rank the same static expert shapes (and FSDP already
gathers the expert weights collectively at that call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _sum_over_ranks(group):
    def reduce(timings: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return timings
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = timings.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t.cpu()
    return reduce


def agree_on_expert_gemm(model: nn.Module, group=None) -> None:
    """Give every expert module of `model` the all-reduce (over `group`, default all ranks) that
    the GEMM selector uses."""
    reduce = _sum_over_ranks(group)
    for layer in model.moe_layers():
        layer.experts.gemm_agreement = reduce
