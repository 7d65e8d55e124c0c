"""The MoE layers against independent float64 references (Algorithm 1 of the paper, GShard)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from ecdit_dist.model.moe import ExpertChoiceMoE, TokenChoiceMoE, expert_capacity
from ecdit_dist.model.routing import token_choice


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def algorithm1(x, router_w, w1, w2, group_size, capacity):
    """Paper Algorithm 1 with one-hot dispatch einsums, on groups of consecutive tokens."""
    B, S, d = x.shape
    E = router_w.shape[0]
    x_p = x.reshape(-1, group_size, d)                                   # groups play the role of B
    logits = torch.einsum("bsd,de->bse", x_p, router_w.T)
    affinity = torch.softmax(logits, dim=-1)
    affinity = torch.einsum("bse->bes", affinity)
    gating, index = torch.topk(affinity, k=capacity, dim=-1)
    dispatch = F.one_hot(index, num_classes=group_size).to(x.dtype)     # (G, E, C, g)
    x_in = torch.einsum("becs,bsd->becd", dispatch, x_p)
    x_e = torch.stack([F.gelu(x_in[:, e] @ w1[e], approximate="tanh") @ w2[e] for e in range(E)], dim=1)
    x_out = torch.einsum("becs,bec,becd->bsd", dispatch, gating, x_e)
    return x_out.reshape(B, S, d)


CASES = [  # (E, group_size, capacity_factor, batch, seq)
    (4, 16, 2.0, 2, 16),
    (8, 32, 1.0, 3, 32),
    (2, 8, 2.0, 1, 16),      # C = group_size: every expert takes every token
    (6, 12, 1.5, 2, 18),     # groups span image boundaries
    (16, 64, 2.0, 1, 128),
    (3, 10, 2.0, 2, 5),      # C = ceil(20 / 3) = 7: non-integer capacity
]


@pytest.mark.parametrize("E,g,cf,B,S", CASES)
def test_expert_choice_equals_algorithm1_float64(E, g, cf, B, S):
    seed = fresh_seed()
    d, h = 12, 20
    moe = ExpertChoiceMoE(d, h, E, cf, g).double()
    with torch.no_grad():  # spread the router so affinities are far from ties
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(B, S, d, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    params = [moe.router.weight, moe.experts.w1, moe.experts.w2]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]

    out = moe(x)
    ref = algorithm1(x_ref, *ref_params, g, expert_capacity(g, cf, E))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"forward differs (seed {seed})")

    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12, msg=f"dx differs (seed {seed})")
    for name, p, q in zip(("router", "w1", "w2"), params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"d{name} differs (seed {seed})")


@pytest.mark.parametrize("E,g,cf,B,S", CASES)
def test_every_expert_takes_exactly_capacity_tokens(E, g, cf, B, S):
    seed = fresh_seed()
    moe = ExpertChoiceMoE(8, 16, E, cf, g)
    x = torch.randn(B * S // g, g, 8)
    C = expert_capacity(g, cf, E)
    assert C == min(g, math.ceil(g * cf / E))
    gate, rows = moe.route(x, C)                                 # (E, G*C)
    G = x.shape[0]
    per_group = rows.view(E, G, C) // g
    assert torch.equal(per_group, torch.arange(G).view(1, G, 1).expand(E, G, C)), f"seed {seed}"
    for e in range(E):
        for grp in range(G):
            chosen = rows.view(E, G, C)[e, grp]
            assert chosen.unique().numel() == C, f"expert {e} group {grp} repeated a token (seed {seed})"
    mean, mx, unchosen = moe.stats.tolist()
    assert mean == pytest.approx(E * C / g)
    assert 0 <= unchosen <= 1 and mx <= E
    if (g * cf) % E == 0:
        assert mean == pytest.approx(cf)      # experts per token averages the capacity factor
    assert (gate > 0).all() and (gate <= 1).all()


def test_unchosen_tokens_get_zero_and_chosen_do_not():
    seed = fresh_seed()
    E, g = 4, 32
    moe = ExpertChoiceMoE(8, 16, E, capacity_factor=0.5, group_size=g)   # C = 4: most tokens unchosen
    x = torch.randn(2, g, 8)
    out = moe(x).reshape(-1, 8)
    _, rows = moe.route(x.reshape(-1, g, 8), expert_capacity(g, 0.5, E))
    chosen = torch.zeros(out.shape[0], dtype=torch.bool)
    chosen[rows.reshape(-1)] = True
    assert (~chosen).any(), f"seed {seed}: expected unchosen tokens"
    assert torch.equal(out[~chosen], torch.zeros_like(out[~chosen]))
    assert (out[chosen].abs().sum(dim=-1) > 0).all()
    assert moe.stats[2].item() == pytest.approx((~chosen).float().mean().item())


def test_group_size_must_divide_tokens():
    moe = ExpertChoiceMoE(8, 16, 4, 2.0, group_size=16)
    with pytest.raises(ValueError, match="groups of 16"):
        moe(torch.randn(1, 10, 8))


def gshard_reference(x, router_w, w1, w2, k, g, cap):
    """Loop-by-loop GShard top-k with priority (choice rank, then position) and capacity."""
    tokens = x.reshape(-1, x.shape[-1])
    E = router_w.shape[0]
    out = torch.zeros_like(tokens)
    aux = 0.0
    G = tokens.shape[0] // g
    for grp in range(G):
        xs = tokens[grp * g:(grp + 1) * g]
        probs = torch.softmax(xs @ router_w.T, dim=-1)
        top_p, top_e = probs.topk(k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        load = [0] * E
        for rank in range(k):
            for i in range(g):
                e = int(top_e[i, rank])
                if cap is not None and load[e] >= cap:
                    continue
                load[e] += 1
                y = F.gelu(xs[i] @ w1[e], approximate="tanh") @ w2[e]
                out[grp * g + i] = out[grp * g + i] + gates[i, rank] * y
        first = torch.bincount(top_e[:, 0], minlength=E).to(x.dtype) / g
        aux = aux + E * (first * probs.mean(0)).sum()
    return out.view_as(x), aux / G


@pytest.mark.parametrize("E,k,g,cap_factor", [(4, 2, 16, 1.0), (8, 2, 32, None), (4, 1, 8, 0.5), (6, 2, 12, 1.25),
                                              (5, 3, 10, 0.7)])
def test_token_choice_equals_gshard_reference_float64(E, k, g, cap_factor):
    seed = fresh_seed()
    d, h = 10, 14
    moe = TokenChoiceMoE(d, h, E, top_k=k, token_capacity_factor=cap_factor, group_size=g).double()
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(2, g, d, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    params = [moe.router.weight, moe.experts.w1, moe.experts.w2]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    cap = None if cap_factor is None else math.ceil(k * g * cap_factor / E)
    out = moe(x)
    ref, aux_ref = gshard_reference(x_ref, *ref_params, k, g, cap)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(moe.aux_loss, aux_ref, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    probe = torch.randn_like(out)
    ((out * probe).sum() + moe.aux_loss).backward()
    ((ref * probe).sum() + aux_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12, msg=f"seed {seed}")
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"seed {seed}")


def test_token_choice_balanced_router_has_aux_loss_one():
    moe = TokenChoiceMoE(8, 16, 4, top_k=2, group_size=8)
    with torch.no_grad():
        moe.router.weight.zero_()       # uniform probabilities: P_e = 1/E, loss = E * sum f_e / E = 1
    moe(torch.randn(1, 8, 8))
    assert moe.aux_loss.item() == pytest.approx(1.0)


def test_token_choice_slots_are_static_and_filled_in_priority_order():
    seed = fresh_seed()
    G, g, E, k, cap = 3, 12, 4, 2, 5
    logits = torch.randn(G, g, E)
    choice = token_choice(logits, k, cap)
    assert choice.rows.shape == choice.gate.shape == choice.filled.shape == (E, G * cap)
    top_e = logits.topk(k, dim=-1).indices                                       # (G, g, k)
    for grp in range(G):
        for e in range(E):
            # assignments to e in priority order: first choices by position, then second choices
            wanted = [grp * g + i for r in range(k) for i in range(g) if top_e[grp, i, r] == e][:cap]
            slots = slice(grp * cap, (grp + 1) * cap)
            got = choice.rows[e, slots][choice.filled[e, slots]].tolist()
            assert got == wanted, f"seed {seed}: expert {e} group {grp}"
            assert (choice.gate[e, slots][~choice.filled[e, slots]] == 0).all()
            assert (choice.gate[e, slots][choice.filled[e, slots]] > 0).all()


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_moe_layer_has_no_host_sync(router):
    """Forward and backward of a MoE layer issue no host-device synchronisation."""
    fresh_seed()
    if router == "token_choice":
        moe = TokenChoiceMoE(8, 16, 4, top_k=2, token_capacity_factor=1.0, group_size=16)
    else:
        moe = ExpertChoiceMoE(8, 16, 4, 2.0, group_size=16, expert_gemm="mm_loop")
    x = torch.randn(2, 16, 8, requires_grad=True)
    from host_sync import count_host_syncs

    with count_host_syncs() as syncs:
        out = moe(x)
        loss = out.square().sum() + (moe.aux_loss if moe.aux_loss is not None else 0)
        loss.backward()
    assert syncs.ops == []
    assert x.grad.abs().sum() > 0
