"""Routing decisions as pure functions: who processes which token, with what weight.

Expert choice (EC-DiT, paper eq. 5-6): within a group of g tokens every expert takes
its C highest-affinity tokens; the gate is the affinity itself. Token choice (GShard):
every token takes its top-k experts, experts have a bounded buffer, and a
load-balancing loss keeps the assignment even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to float32; leave float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class ExpertChoice:
    gate: torch.Tensor   # (G, E, C) affinity of each chosen token, fp32 or wider
    index: torch.Tensor  # (G, E, C) position of the chosen token inside its group


def expert_choice(logits: torch.Tensor, capacity: int) -> ExpertChoice:
    """logits (G, g, E) -> every expert's top-`capacity` tokens of each group.

    Affinity is the softmax over experts, in float32 (eq. 5); selection is along the
    token axis (eq. 6), so each expert gets exactly `capacity` tokens per group.
    """
    affinity = torch.softmax(at_least_fp32(logits), dim=-1)                    # (G, g, E)
    gate, index = affinity.transpose(1, 2).topk(capacity, dim=-1)       # (G, E, C)
    return ExpertChoice(gate=gate, index=index)


@dataclass
class TokenChoice:
    token: torch.Tensor   # (A,) flat token index of each kept assignment, sorted by expert
    gate: torch.Tensor    # (A,) combine weight of each kept assignment, fp32
    counts: torch.Tensor  # (E,) kept assignments per expert (int64)
    aux_loss: torch.Tensor  # () GShard load-balancing loss


def token_choice(logits: torch.Tensor, top_k: int, capacity: int | None) -> TokenChoice:
    """logits (G, g, E) -> top-k experts per token, GShard style.

    Gates are the top-k probabilities renormalised to sum to 1. When `capacity` is
    set, an expert keeps at most that many assignments per group, first-choice
    assignments taking priority over second choices (and earlier tokens over later
    ones); the rest are dropped (the residual carries those tokens). The loss is
    E * sum_e f_e * P_e with f_e the share of tokens whose first choice is e and
    P_e the mean probability of e, averaged over groups.
    """
    G, g, E = logits.shape
    probs = torch.softmax(at_least_fp32(logits), dim=-1)                       # (G, g, E)
    top_p, top_e = probs.topk(top_k, dim=-1)                            # (G, g, k)
    gates = top_p / top_p.sum(dim=-1, keepdim=True)                     # (G, g, k)

    first = F.one_hot(top_e[..., 0], E).to(probs.dtype)                         # (G, g, E)
    aux = E * (first.mean(dim=1) * probs.mean(dim=1)).sum(dim=-1).mean()

    # assignments ordered by priority: choice rank, then token position
    e_prio = top_e.transpose(1, 2).reshape(G, top_k * g)                # (G, k*g)
    gate_prio = gates.transpose(1, 2).reshape(G, top_k * g)             # (G, k*g)
    tok_prio = torch.arange(g, device=logits.device).repeat(top_k)      # (k*g,)
    tok_prio = tok_prio + g * torch.arange(G, device=logits.device)[:, None]  # (G, k*g)
    if capacity is not None:
        onehot = F.one_hot(e_prio, E)                                   # (G, k*g, E)
        slot = (onehot.cumsum(dim=1) * onehot).sum(-1) - 1             # (G, k*g)
        keep = slot < capacity
    else:
        keep = torch.ones_like(e_prio, dtype=torch.bool)
    e_flat, gate_flat, tok_flat = e_prio[keep], gate_prio[keep], tok_prio[keep]
    order = torch.argsort(e_flat, stable=True)
    counts = torch.bincount(e_flat, minlength=E)
    return TokenChoice(token=tok_flat[order], gate=gate_flat[order], counts=counts, aux_loss=aux)
