"""Routing decisions as pure functions: who processes which token, with what weight.

Expert choice (EC-DiT, paper eq. 5-6): within a group of g tokens every expert takes
its C highest-affinity tokens; the gate is the affinity itself. Token choice (GShard):
every token takes its top-k experts, experts have a bounded buffer, and a
load-balancing loss keeps the assignment even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    rows: torch.Tensor    # (E, G*cap) flat token index of each expert slot, group-major; 0 where empty
    gate: torch.Tensor    # (E, G*cap) combine weight of each slot, fp32 or wider; 0 where empty
    filled: torch.Tensor  # (E, G*cap) bool: the slot holds a kept assignment
    aux_loss: torch.Tensor  # () GShard load-balancing loss


def token_choice(logits: torch.Tensor, top_k: int, capacity: int | None) -> TokenChoice:
    """logits (G, g, E) -> top-k experts per token, GShard style, in a static slot buffer.

    Gates are the top-k probabilities renormalised to sum to 1. Every expert has `capacity`
    slots per group (None: g, enough for every token); its assignments fill them in priority
    order, first choices before second choices and earlier tokens before later ones; the
    assignments beyond its slots are dropped (the residual carries those tokens) and slots
    left over stay empty (gate 0). Every shape depends only on (G, g, E, capacity), and the
    computation reads no value back to the host. The loss is E * sum_e f_e * P_e with f_e
    the share of tokens whose first choice is e and P_e the mean probability of e, averaged
    over groups.
    """
    G, g, E = logits.shape
    cap = g if capacity is None else min(capacity, g)      # an expert gets at most g assignments per group
    probs = torch.softmax(at_least_fp32(logits), dim=-1)                       # (G, g, E)
    top_p, top_e = probs.topk(top_k, dim=-1)                            # (G, g, k)
    gates = top_p / top_p.sum(dim=-1, keepdim=True)                     # (G, g, k)
    experts = torch.arange(E, device=logits.device)

    first = (top_e[..., :1] == experts).to(probs.dtype)                 # (G, g, E) one-hot first choice
    aux = E * (first.mean(dim=1) * probs.mean(dim=1)).sum(dim=-1).mean()

    # assignments ordered by priority: choice rank, then token position
    A = top_k * g
    e_prio = top_e.transpose(1, 2).reshape(G, A)                        # (G, k*g)
    gate_prio = gates.transpose(1, 2).reshape(G, A)                     # (G, k*g)
    group = torch.arange(G, device=logits.device)[:, None]              # (G, 1)
    tok_prio = torch.arange(g, device=logits.device).repeat(top_k) + g * group   # (G, k*g)
    onehot = (e_prio.unsqueeze(-1) == experts).long()                   # (G, k*g, E)
    slot = (onehot.cumsum(dim=1) * onehot).sum(-1) - 1                  # rank among the expert's assignments
    keep = slot < cap
    # destination in the (E, G, cap) buffer; a dropped assignment gets its own place past the end
    # (every index distinct: a deterministic scatter), cut off below
    size = E * G * cap
    dest = torch.where(keep, (e_prio * G + group) * cap + slot, size + group * A + torch.arange(A, device=logits.device))
    dest = dest.reshape(-1)
    rows = tok_prio.new_zeros(size + G * A).scatter(0, dest, tok_prio.reshape(-1))[:size]
    gate = gate_prio.new_zeros(size + G * A).scatter(0, dest, gate_prio.reshape(-1))[:size]
    filled = keep.new_zeros(size + G * A).scatter(0, dest, keep.reshape(-1))[:size]
    return TokenChoice(rows=rows.view(E, G * cap), gate=gate.view(E, G * cap), filled=filled.view(E, G * cap),
                       aux_loss=aux)
