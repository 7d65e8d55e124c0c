"""Turn a plain ECDiT into its distributed form, in this order:

    tensor parallel (DTensor plans)  ->  expert parallel (all-to-all hooks)
    ->  activation checkpointing     ->  ZeRO-3 (FSDP2, per block; experts on their own mesh)

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
from ecdit_dist.parallel.ac import apply_activation_checkpointing
from ecdit_dist.parallel.dims import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config) -> nn.Module:
    # DTensor notes every two-step redistribution (e.g. gathering a norm over (dp_shard, tp)) at
    # WARNING level; they are expected for these meshes and would flood every rank's log.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if dims.world > 1:
        if dims.tp > 1:
            from ecdit_dist.parallel.tp import apply_tensor_parallel

            apply_tensor_parallel(model, dims.mesh("dense", "tp"))
        if dims.ep > 1:
            from ecdit_dist.parallel.ep import apply_expert_parallel

            apply_expert_parallel(model, dims.mesh("expert", "ep"))
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dims.world > 1:
        apply_fsdp(model, dims, cfg)
    return model


def mixed_precision(cfg: Config, device_type: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if cfg.train.precision == "bf16" and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


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
            # experts: sharded over expert-data-parallel ranks along d (dim 1), since E / ep is often
            # smaller than the number of those ranks
            fully_shard(block.ffn.experts, mesh=edp_mesh, mp_policy=mp, shard_placement_fn=lambda p: Shard(1))
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def finish_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Corrections after backward (and accumulation), before clipping and the optimizer step."""
    if dims.world == 1:
        return
    if dims.tp > 1:
        from ecdit_dist.parallel.tp import sum_router_grads_over_tp

        sum_router_grads_over_tp(model, dims.group("dense", "tp"))
    from ecdit_dist.parallel.ep import scale_expert_grads

    scale_expert_grads(model, dims.tp / dims.ep)


def _mesh_key(t: torch.Tensor):
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return None
    return (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), mesh.mesh_dim_names)


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (plain tensors and DTensors on any meshes); clip if max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = defaultdict(list)
    for g in grads:
        groups[_mesh_key(g)].append(g)
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
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in (p.grad for p in params if p.grad is not None):
            g.mul_(coef.to(g.device) if not hasattr(g, "device_mesh") else coef.item())
