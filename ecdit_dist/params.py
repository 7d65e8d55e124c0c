"""Parameter accounting: total and activated (per-token) parameters of a model config."""

from __future__ import annotations

import torch

from ecdit_dist.config import ModelConfig, MoEConfig
from ecdit_dist.model import ECDiT
from ecdit_dist.model.moe import ExpertChoiceMoE, TokenChoiceMoE


def count_params(mcfg: ModelConfig, moe: MoEConfig) -> dict[str, int]:
    """Build the model on the meta device (no memory) and count its parameters.

    activated = every non-expert parameter + per MoE layer the expert parameters a token
    uses on average: capacity_factor experts (expert choice) or top_k (token choice).
    The frozen text encoder and VAE are not built; their declared sizes are added to
    both totals and also reported on their own.
    """
    with torch.device("meta"):
        model = ECDiT(mcfg, moe)
    total = sum(p.numel() for p in model.parameters())
    expert_total = 0
    expert_active = 0.0
    for layer in model.moe_layers():
        n = sum(p.numel() for p in layer.experts.parameters())
        per_expert = n / layer.num_experts
        expert_total += n
        if isinstance(layer, ExpertChoiceMoE):
            expert_active += layer.capacity_factor * per_expert
        elif isinstance(layer, TokenChoiceMoE):
            expert_active += layer.top_k * per_expert
    frozen = mcfg.frozen_text_encoder_params + mcfg.frozen_vae_params
    backbone_active = total - expert_total + round(expert_active)
    return {
        "total_params": total + frozen,
        "activated_params": backbone_active + frozen,
        "backbone_params": total,
        "backbone_activated_params": backbone_active,
        "expert_params": expert_total,
        "frozen_text_encoder_params": mcfg.frozen_text_encoder_params,
        "frozen_vae_params": mcfg.frozen_vae_params,
        "moe_layers": len(model.moe_layers()),
        "layers": mcfg.num_layers,
    }
