"""Turn a plain ECDiT into its distributed form, in this order:

    tensor parallel (DTensor plans)  ->  expert parallel (all-to-all hooks)
    ->  activation checkpointing     ->  ZeRO-3 (FSDP2, per block; experts on their own mesh;
                                            each router its own fp32 unit)

One process gets activation checkpointing only. After the backward pass,
`finish_gradients` applies the two corrections that plain FSDP cannot know about
(router gradients summed over tp, expert gradients scaled by tp / ep), and
`clip_grad_norm` computes the true global norm over parameters that live on
different meshes.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from ecdit_dist.config import Config
from ecdit_dist.device import autocast_dtype
from ecdit_dist.optim import mesh_key
from ecdit_dist.parallel.ac import apply_activation_checkpointing
from ecdit_dist.parallel.dims import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config) -> nn.Module:
    # DTensor notes every two-step redistribution (e.g. gathering a norm over (dp_shard, tp)) at
    # WARNING level; they are expected for these meshes and would flood every rank's log.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if dims.world > 1:
        from ecdit_dist.parallel.gemm_agreement import agree_on_expert_gemm

        agree_on_expert_gemm(model)
        if dims.tp > 1:
            from ecdit_dist.parallel.tp import apply_tensor_parallel

            apply_tensor_parallel(model, dims.mesh("dense", "tp"))
        if dims.ep > 1:
            from ecdit_dist.parallel.ep import apply_expert_parallel

            apply_expert_parallel(model, dims.mesh("expert", "ep"), cfg.parallel.ep_exchange)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dims.world > 1:
        apply_fsdp(model, dims, cfg)
    return model


def mixed_precision(cfg: Config, device_type: str):
    """FSDP2 policy of the blocks, the experts and the root.

    bf16: weights are gathered in bf16 and gradients reduced in fp32. Module inputs are NOT
    cast (cast_forward_inputs=False): the timestep t, the text, the masks and the residual
    stream keep their dtype, exactly as in one process under autocast, which does the bf16
    compute. (FSDP2's default would round t to bf16 before the sinusoidal embedding of 1000 t,
    an error of up to ~2 rad.) The same policy applies on CPU, where the tests exercise it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if autocast_dtype(cfg.train.precision, device_type) == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def router_precision():
    """The router is its own FSDP unit, always fp32: its weights are gathered in fp32 and its
    input is upcast, so routing logits and choices do not depend on the layout's precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                cast_forward_inputs=True)


def apply_fsdp(model: nn.Module, dims: ParallelDims, cfg: Config) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    # The model never modifies a module output in place (residuals are out-of-place), which is
    # what this FSDP2 warning about returned views guards against.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    mp = mixed_precision(cfg, dims.device_type)
    dp_mesh, edp_mesh = dims.dp_mesh(), dims.edp_mesh()
    for block in model.blocks:
        if block.is_moe:
            fully_shard(block.ffn.router, mesh=dp_mesh, mp_policy=router_precision())
            # experts: sharded over expert-data-parallel ranks along d (dim 1), since E / ep is often
            # smaller than the number of those ranks
            fully_shard(block.ffn.experts, mesh=edp_mesh, mp_policy=mp, shard_placement_fn=lambda p: Shard(1))
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def set_gradient_sync(model: nn.Module, sync: bool, cfg: Config) -> None:
    """Under accumulation, let FSDP reduce gradients only on the last micro-batch (unless
    parallel.sync_every_micro_batch). No-op in one process."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync or cfg.parallel.sync_every_micro_batch)


def finish_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Corrections after backward (and accumulation), before clipping and the optimizer step."""
    if dims.world == 1:
        return
    if dims.tp > 1:
        from ecdit_dist.parallel.tp import sum_router_grads_over_tp

        sum_router_grads_over_tp(model, dims.group("dense", "tp"))
    from ecdit_dist.parallel.ep import scale_expert_grads

    scale_expert_grads(model, dims.tp / dims.ep)


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (plain tensors and DTensors on any meshes); clip if max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = defaultdict(list)
    for g in grads:
        groups[mesh_key(g)].append(g)
    total_sq = None
    for key, gs in groups.items():
        norm = torch.nn.utils.get_total_norm(gs, norm_type=2.0)
        if key is not None:
            norm = norm.full_tensor()
        sq = norm.float() ** 2
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    if total_sq is None:
        return torch.zeros(())
    total = total_sq.sqrt()
    clip_grads_to_norm(params, total, max_norm)
    return total


def clip_grads_to_norm(params: list[nn.Parameter], total: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients so that their global norm `total` (from clip_grad_norm) becomes at most
    max_norm; nothing when max_norm is 0."""
    if max_norm > 0 and math.isfinite(max_norm):
        # the coefficient stays a device tensor (no host sync); one foreach multiply per device
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        local: dict = defaultdict(list)
        for g in (p.grad for p in params if p.grad is not None):
            t = g.to_local() if hasattr(g, "to_local") else g
            local[t.device].append(t)
        for device, ts in local.items():
            torch._foreach_mul_(ts, coef.to(device))
