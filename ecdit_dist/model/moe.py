"""FFN and Mixture-of-Experts layers.

`ExpertChoiceMoE` is the EC-DiT layer (paper eq. 5-8, Algorithm 1), written as named
phases: route -> dispatch -> experts -> combine. Dispatch and combine are a gather and
a scatter-add over flat token indices; the experts run as one autograd function over
stacked weights, in the GEMM call forms that are fastest on the backend at hand (see
`ecdit_dist.model.expert_gemm`). The one-hot einsum of Algorithm 1 is kept only as the
test reference.

Token choice (GShard) fills the same kind of buffer: every expert has a fixed number of
slots per group, and empty slots carry gate 0.

The dispatch buffer is expert-major, (E, G*C, d): expert parallelism (see
`ecdit_dist.parallel.ep`) splits its first axis over ranks with one all-to-all and
nothing else changes here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecdit_dist.model.expert_gemm import FORMS, expert_ffn, plan_for
from ecdit_dist.model.routing import at_least_fp32, expert_choice, token_choice


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a distributed (DTensor) weight; plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


def expert_capacity(group_size: int, capacity_factor: float, num_experts: int) -> int:
    """C = ceil(group_size * capacity_factor / num_experts) (paper eq. 6), at most group_size."""
    return min(group_size, math.ceil(group_size * capacity_factor / num_experts - 1e-9))


class FeedForward(nn.Module):
    """Dense FFN: GELU(x W1) W2, no biases (the same function as one expert)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))

    def init_weights(self) -> None:
        for lin in (self.w1, self.w2):
            nn.init.xavier_uniform_(lin.weight)


class GroupedExperts(nn.Module):
    """E experts with stacked weights w1 (E, d, d_ff) and w2 (E, d_ff, d).

    `forward` takes an expert-major buffer (E_local, T, d) and runs `expert_ffn`, whose
    GEMM forms are measured at first use (`gemm="auto"`) or forced (`gemm="mm_loop"`, ...).
    Expert parallelism wraps this module with all-to-all hooks, so it only ever sees
    the experts it owns. Always call the module (not a method): ZeRO-3 gathers the
    weights in the module's forward hooks.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, gemm: str = "auto") -> None:
        super().__init__()
        if gemm != "auto" and gemm not in FORMS:
            raise ValueError(f"unknown expert GEMM form {gemm!r} (moe.expert_gemm); choose auto or one of "
                             f"{', '.join(FORMS)}")
        self.num_experts = num_experts
        self.gemm = gemm
        # Combines the GEMM timings over ranks so that all choose the same plan (set by the
        # parallel layer; None = choose locally).
        self.gemm_agreement = None
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (E_local, T, d) -> (E_local, T, d): every local expert on its T rows."""
        w1, w2 = _local(self.w1), _local(self.w2)
        E, T, d = x.shape
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        plan = plan_for(E, T, d, w1.shape[-1], dtype, x.device, self.gemm, self.gemm_agreement)
        return expert_ffn(x, w1, w2, plan)                       # (E_local, T, d)

    def init_weights(self) -> None:
        d, h = self.w1.shape[-2:]
        bound = math.sqrt(6.0 / (d + h))  # xavier-uniform of a single (d, d_ff) matrix
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)


class _MoEBase(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_experts: int, group_size: int,
                 eval_group_size: int | None, expert_gemm: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.group_size = group_size
        self.eval_group_size = eval_group_size or group_size
        self.router = nn.Linear(dim, num_experts, bias=False)  # router.weight: (E, d)
        self.experts = GroupedExperts(num_experts, dim, ffn_dim, expert_gemm)
        self.stats: torch.Tensor | None = None       # (3,) experts/token mean, max, unchosen share
        self.aux_loss: torch.Tensor | None = None
        # Order of the experts along the dispatch buffer; None = 0..E-1. Expert parallelism sets a
        # permutation that makes every all-to-all chunk contiguous (see parallel/ep.py).
        self.expert_order: torch.Tensor | None = None
        self._order_cache: torch.Tensor | None = None

    def current_group_size(self, num_tokens: int) -> int:
        g = self.group_size if self.training else self.eval_group_size
        if num_tokens % g:
            phase = "moe.group_size" if self.training else "moe.eval_group_size"
            raise ValueError(f"{num_tokens} tokens cannot be split into groups of {g} ({phase}); "
                             f"use a batch whose token count is a multiple of {g}")
        return g

    def gating(self, tokens: torch.Tensor) -> torch.Tensor:
        """Router logits in float32 (or float64 for float64 inputs): (..., d) -> (..., E).

        The router module is called (not its weight read), so that a distributed wrapper that
        gathers its weight in its own forward (FSDP, fp32 policy) sees the call."""
        x = at_least_fp32(tokens)
        with torch.autocast(tokens.device.type, enabled=False):
            if self.router.weight.dtype == x.dtype:
                return self.router(x)
            return F.linear(x, at_least_fp32(self.router.weight))

    @torch.no_grad()
    def _record(self, token_index: torch.Tensor, num_tokens: int, filled: torch.Tensor | None = None) -> None:
        """Routing statistics of the slots `token_index` (only those `filled` marks, when given)."""
        per_token = torch.zeros(num_tokens, device=token_index.device)
        ones = torch.ones_like(token_index.reshape(-1), dtype=per_token.dtype)
        if filled is not None:
            ones = filled.reshape(-1).to(per_token.dtype)
        per_token.index_add_(0, token_index.reshape(-1), ones)
        self.stats = torch.stack([per_token.mean(), per_token.max(), (per_token == 0).float().mean()])

    def init_weights(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts.init_weights()

    def in_expert_order(self, *slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(E, ...) per-expert tensors reordered along E into `expert_order` (unchanged if None)."""
        if self.expert_order is None:
            return slots
        order = self._order_on(slots[0].device)
        return tuple(t.index_select(0, order) for t in slots)

    def _order_on(self, device: torch.device) -> torch.Tensor:
        """`expert_order` on `device`, copied once and cached (no copy per forward or recompute)."""
        cached = self._order_cache
        if cached is None or cached.device != device:
            cached = self._order_cache = self.expert_order.to(device)
        return cached

    @staticmethod
    def dispatch(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        E = rows.shape[0]
        return tokens.index_select(0, rows.reshape(-1)).view(E, -1, tokens.shape[-1])  # (E, G*C, d)

    @staticmethod
    def combine(y_e: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Sum over experts of gate x expert output, accumulated in fp32 (or wider) whatever the
        compute dtype, then returned in the experts' dtype. (On CUDA, index_add's float atomics
        make the order of the few additions per token vary: a relative error of ~1e-7 in fp32.)"""
        acc = torch.promote_types(y_e.dtype, torch.float32)
        weighted = y_e.to(acc) * gate.unsqueeze(-1).to(acc)  # (E, G*C, d)
        out = torch.zeros(num_tokens, y_e.shape[-1], dtype=acc, device=y_e.device)  # (N, d)
        out = out.index_add(0, rows.reshape(-1), weighted.reshape(-1, y_e.shape[-1]))
        return out.to(y_e.dtype)




class ExpertChoiceMoE(_MoEBase):
    """Expert-choice MoE on (B, S, d) inputs.

    Tokens are taken in groups of `group_size` consecutive tokens of the flattened
    (batch, sequence); in each group every expert picks its top-C tokens by affinity
    (C = ceil(group_size * capacity_factor / num_experts)) and its output is weighted
    by that affinity. A token no expert picked gets 0. No auxiliary loss.
    """

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, capacity_factor: float = 2.0,
                 group_size: int = 1024, eval_group_size: int | None = None, expert_gemm: str = "auto") -> None:
        super().__init__(dim, ffn_dim, num_experts, group_size, eval_group_size, expert_gemm)
        self.capacity_factor = capacity_factor
        for g in (self.group_size, self.eval_group_size):
            if expert_capacity(g, capacity_factor, num_experts) < 1:
                raise ValueError(f"capacity ceil({g} * {capacity_factor} / {num_experts}) < 1")
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, S, d)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])                    # (N, d)
        n = tokens.shape[0]
        g = self.current_group_size(n)
        capacity = expert_capacity(g, self.capacity_factor, self.num_experts)
        gate, rows = self.route(tokens.view(n // g, g, -1), capacity)  # (E, G*C) each
        x_e = self.dispatch(tokens, rows)                    # (E, G*C, d)
        y_e = self.experts(x_e)                              # (E, G*C, d)
        return self.combine(y_e, gate, rows, n).view(shape)

    def route(self, groups: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """groups (G, g, d) -> gate (E, G*C) fp32 and rows (E, G*C): flat token indices, one row
        per expert (in `expert_order` when set)."""
        G, g, _ = groups.shape
        choice = expert_choice(self.gating(groups), capacity)  # (G, E, C)
        offset = torch.arange(G, device=groups.device).view(G, 1, 1) * g
        rows = (choice.index + offset).transpose(0, 1).reshape(self.num_experts, -1)  # (E, G*C)
        gate = choice.gate.transpose(0, 1).reshape(self.num_experts, -1)              # (E, G*C)
        gate, rows = self.in_expert_order(gate, rows)
        self._record(rows, G * g)
        return gate, rows


class TokenChoiceMoE(_MoEBase):
    """Token-choice top-k MoE (GShard baseline) with the same interface.

    Each token picks its top_k experts; an expert takes at most
    ceil(top_k * group_size * token_capacity_factor / E) assignments per group (None:
    no limit, i.e. group_size slots, E / top_k times the expert work of a full buffer).
    The buffer is static, (E, G * capacity, d), so the layer runs without host syncs and
    expert parallelism exchanges fixed-size chunks exactly as for expert choice.
    `aux_loss` holds the load-balancing loss of the last forward.
    """

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int = 2,
                 token_capacity_factor: float | None = 1.25, group_size: int = 1024,
                 eval_group_size: int | None = None) -> None:
        super().__init__(dim, ffn_dim, num_experts, group_size, eval_group_size)
        self.top_k = top_k
        self.token_capacity_factor = token_capacity_factor
        self.init_weights()

    def capacity(self, group_size: int) -> int:
        """Slots per expert and group: ceil(top_k * g * token_capacity_factor / E), at most g
        (without a factor: g, which no expert can exceed)."""
        if self.token_capacity_factor is None:
            return group_size
        return min(group_size, math.ceil(self.top_k * group_size * self.token_capacity_factor / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, S, d)
        """Route, then the same static dispatch -> experts -> combine as expert choice: each expert
        gets its G * cap slots (empty ones hold token 0 with gate 0 and add exactly nothing)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])                    # (N, d)
        n = tokens.shape[0]
        g = self.current_group_size(n)
        choice = token_choice(self.gating(tokens.view(n // g, g, -1)), self.top_k, self.capacity(g))
        self.aux_loss = choice.aux_loss
        gate, rows, filled = self.in_expert_order(choice.gate, choice.rows, choice.filled)   # (E, G*cap) each
        self._record(rows, n, filled)
        x_e = self.dispatch(tokens, rows)                    # (E, G*cap, d)
        y_e = self.experts(x_e)                              # (E, G*cap, d)
        return self.combine(y_e, gate, rows, n).view(shape)
