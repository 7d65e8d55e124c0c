"""Optimizers (RMSProp with momentum, AdamW), the learning-rate schedule and weight EMA."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from ecdit_dist.config import OptimConfig
from ecdit_dist.parallel.ac import clean_fqn


def mesh_key(t: torch.Tensor):
    """Which device mesh a tensor lives on (the DeviceMesh, which compares by ranks, shape and
    dimension names and caches its hash: no read of the mesh's rank tensor); None for a plain tensor."""
    return getattr(t, "device_mesh", None)


def by_mesh(params: Iterable[torch.Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by mesh, groups in order of first appearance."""
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault(mesh_key(p), []).append(i)
    return list(groups.values())


class _StepPerMesh:
    """Run the optimizer's foreach kernels once per device mesh.

    foreach kernels take many tensors in one dispatch, but not DTensors of different meshes
    (dense weights and experts live on different ones) together. During `step` each parameter
    group is split by mesh (same hyperparameters, same per-parameter state); outside it the
    groups are untouched, so the optimizer's state dict (and every checkpoint) has the same
    structure on every layout."""

    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [{**g, "params": [g["params"][i] for i in idx]}
                             for g in groups for idx in by_mesh(g["params"])]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


class RMSprop(_StepPerMesh, torch.optim.RMSprop):
    pass


class AdamW(_StepPerMesh, torch.optim.AdamW):
    pass


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "rmsprop":
        return RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       momentum=cfg.momentum, foreach=True)
    return AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for the update that completes step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of the trainable weights, kept in float32.

    The shadow tensors have the same type as the parameters (plain or DTensor), so under
    FSDP they are sharded exactly like the weights and checkpointed with them.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            clean_fqn(name): p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow += (1 - decay) (weight - shadow): one foreach lerp per device mesh."""
        d = self.decay_at(step)
        pairs = [(self.shadow[clean_fqn(n)], p.detach()) for n, p in model.named_parameters()
                 if clean_fqn(n) in self.shadow]
        for idx in by_mesh([s for s, _ in pairs]):
            shadows = [pairs[i][0] for i in idx]
            weights = [pairs[i][1] if pairs[i][1].dtype == pairs[i][0].dtype else pairs[i][1].float() for i in idx]
            torch._foreach_lerp_(shadows, weights, 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            shadow = self.shadow.get(clean_fqn(name))
            if shadow is not None:
                p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow
