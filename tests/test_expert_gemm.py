"""The expert FFN function in every GEMM form the selector can choose, forced one by one, against
the float64 one-hot reference of Algorithm 1 and against numerical gradients."""

import random

import pytest
import torch
import torch.nn.functional as F

from ecdit_dist.model import expert_gemm
from ecdit_dist.model.expert_gemm import ExpertFFN, GemmPlan, batched_mm, candidates, plan_for
from ecdit_dist.model.moe import ExpertChoiceMoE, expert_capacity
from test_moe import algorithm1, fresh_seed

CPU_FORMS = ("bmm", "bmm_contiguous", "mm_loop")
# one plan per form, plus mixed plans: every role's branch in every form is exercised
PLANS = [GemmPlan.forced(f) for f in CPU_FORMS] + [GemmPlan("mm_loop", "bmm_contiguous", "bmm"),
                                                   GemmPlan("bmm", "mm_loop", "bmm_contiguous")]


def grouped_runs_here() -> bool:
    """torch._grouped_mm exists and runs fp32 on this device (a CPU fallback in recent torch)."""
    try:
        batched_mm(torch.randn(2, 8, 4), torch.randn(2, 4, 8).transpose(1, 2).contiguous().transpose(1, 2), "grouped")
        return True
    except (RuntimeError, AttributeError):
        return False


def equivalence(moe, E, g, cf, B, S, dtype=torch.float64, rtol=1e-9, atol=1e-12):
    """Forward and all gradients of `moe` against Algorithm 1 in float64; returns the seed."""
    seed = fresh_seed()
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x64 = torch.randn(B, S, moe.dim, dtype=torch.float64)
    x = x64.to(dtype).clone().requires_grad_(True)
    x_ref = x64.clone().requires_grad_(True)
    params = [moe.router.weight, moe.experts.w1, moe.experts.w2]
    ref_params = [p.detach().double().clone().requires_grad_(True) for p in params]
    out = moe(x)
    ref = algorithm1(x_ref, *ref_params, g, expert_capacity(g, cf, E))
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol, msg=f"forward (seed {seed})")
    probe = torch.randn_like(ref)
    (out * probe.to(dtype)).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=rtol, atol=atol, msg=f"dx (seed {seed})")
    for name, p, q in zip(("router", "w1", "w2"), params, ref_params):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=rtol, atol=atol, msg=f"d{name} (seed {seed})")


@pytest.mark.parametrize("form", CPU_FORMS)
@pytest.mark.parametrize("E,g,cf,B,S", [(4, 16, 2.0, 2, 16), (3, 10, 2.0, 2, 5), (16, 64, 2.0, 1, 128)])
def test_forced_form_equals_algorithm1_float64(form, E, g, cf, B, S):
    moe = ExpertChoiceMoE(12, 20, E, cf, g, expert_gemm=form).double()
    equivalence(moe, E, g, cf, B, S)


def test_auto_plan_equals_algorithm1_float64():
    expert_gemm.clear_cache()
    moe = ExpertChoiceMoE(12, 20, 8, 2.0, 32, expert_gemm="auto").double()
    equivalence(moe, 8, 32, 2.0, 2, 32)
    (key, (plan, timings)), = expert_gemm.chosen().items()
    assert key[:4] == (8, 2 * 8, 12, 20) and key[4] == torch.float64 and key[-1] is False      # (E, G*C, d, d_ff): 2 groups, C = 8
    for role in expert_gemm.ROLES:
        assert set(timings[role]) == set(candidates(role, torch.device("cpu"), torch.float64))
        assert getattr(plan, role) == expert_gemm.pick(timings[role])


@pytest.mark.skipif(not grouped_runs_here(), reason="torch._grouped_mm does not run float32 on this device")
def test_forced_grouped_form_equals_algorithm1():
    """grouped has no float64 kernel: float32 against the float64 reference, float32 tolerances."""
    moe = ExpertChoiceMoE(16, 32, 4, 2.0, 16, expert_gemm="grouped")
    equivalence(moe, 4, 16, 2.0, 2, 16, dtype=torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.fwd}-{p.dgrad}-{p.wgrad}")
def test_expert_function_gradcheck(plan):
    fresh_seed()
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ExpertFFN.apply(a, b, c, plan), (x, w1, w2))
    # and the products are the per-expert reference itself
    ref = torch.stack([F.gelu(x[e] @ w1[e], approximate="tanh") @ w2[e] for e in range(3)])
    torch.testing.assert_close(ExpertFFN.apply(x, w1, w2, plan), ref, rtol=1e-12, atol=1e-14)


def test_bmm_plan_is_bitwise_the_autograd_of_bmm():
    """The default form reproduces the previous bmm -> gelu -> bmm autograd graph bit for bit."""
    fresh_seed()
    x, w1, w2 = torch.randn(4, 16, 8), torch.randn(4, 8, 24), torch.randn(4, 24, 8)
    ins = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    ref_ins = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    out = ExpertFFN.apply(*ins, GemmPlan.forced("bmm"))
    ref = torch.bmm(F.gelu(torch.bmm(ref_ins[0], ref_ins[1]), approximate="tanh"), ref_ins[2])
    probe = torch.randn_like(ref)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    assert torch.equal(out, ref)
    for a, b in zip(ins, ref_ins):
        assert torch.equal(a.grad, b.grad)


def test_agreement_decides_the_plan():
    """The reduced timings, not this process's own, pick the plan (what keeps ranks identical)."""
    seen = []

    def prefer_mm_loop(vec):
        seen.append(vec.clone())
        flat = [(r, f) for r in expert_gemm.ROLES for f in candidates(r, torch.device("cpu"), torch.float32)]
        return torch.tensor([0.0 if f == "mm_loop" else 1.0 for _, f in flat], dtype=torch.float64)

    expert_gemm.clear_cache()
    try:
        plan = plan_for(2, 8, 4, 8, torch.float32, torch.device("cpu"), agree=prefer_mm_loop)
        again = plan_for(2, 8, 4, 8, torch.float32, torch.device("cpu"), agree=prefer_mm_loop)
    finally:
        expert_gemm.clear_cache()
    assert plan == again == GemmPlan.forced("mm_loop")
    assert len(seen) == 1 and (seen[0] > 0).all()       # measured once, real seconds went in


def test_bmm_is_kept_unless_another_form_wins_by_the_margin():
    """Timings within the noise of a shared machine keep bmm; a clear win switches; a failed bmm
    (inf) leaves the fastest form."""
    from ecdit_dist.model.expert_gemm import SWITCH_MARGIN, pick

    rng = random.Random()
    for _ in range(50):
        bmm = rng.uniform(0.01, 10.0)
        close = bmm * rng.uniform(1 - SWITCH_MARGIN + 1e-6, 1.5)
        far = bmm * rng.uniform(0.1, 1 - SWITCH_MARGIN - 1e-6)
        assert pick({"bmm": bmm, "bmm_contiguous": close, "mm_loop": close * 1.01}) == "bmm"
        assert pick({"bmm": bmm, "bmm_contiguous": close, "mm_loop": far}) == "mm_loop"
        assert pick({"bmm": float("inf"), "bmm_contiguous": close, "mm_loop": far}) == "mm_loop"


def test_choosing_a_plan_leaves_the_global_random_stream_alone():
    expert_gemm.clear_cache()
    torch.manual_seed(1)
    plan_for(2, 8, 4, 8, torch.float32, torch.device("cpu"))
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    expert_gemm.clear_cache()


def test_autocast_runs_products_in_autocast_dtype():
    fresh_seed()
    x = torch.randn(2, 8, 8, requires_grad=True)
    w1, w2 = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expert_gemm.expert_ffn(x, w1, w2, GemmPlan.forced("mm_loop"))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w1.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = torch.bmm(F.gelu(torch.bmm(x.bfloat16(), w1.bfloat16()), approximate="tanh"), w2.bfloat16())
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_unknown_form_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="moe.expert_gemm"):
        ExpertChoiceMoE(8, 16, 4, 2.0, 8, expert_gemm="fast")
