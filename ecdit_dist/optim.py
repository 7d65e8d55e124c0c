"""Optimizers (RMSProp with momentum, AdamW), the learning-rate schedule and weight EMA."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from ecdit_dist.config import OptimConfig
from ecdit_dist.parallel.ac import clean_fqn


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # foreach kernels do not accept a mix of DTensors on different meshes; the per-parameter
    # path is the one that runs everywhere (dense weights and experts live on different meshes).
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum, foreach=False)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


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
        d = self.decay_at(step)
        for name, p in model.named_parameters():
            shadow = self.shadow.get(clean_fqn(name))
            if shadow is not None:
                shadow.lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            shadow = self.shadow.get(clean_fqn(name))
            if shadow is not None:
                p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow
