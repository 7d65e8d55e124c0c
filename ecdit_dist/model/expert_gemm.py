"""The expert FFN GELU(x W1_e) W2_e as one autograd function with selectable GEMM forms.

Six batched products make up one forward and backward of E experts (x: (E, T, d),
w1: (E, d, f), w2: (E, f, d), z = x w1, h = GELU(z), y = h w2):

    role   products                                   operand layouts
    fwd    z = x @ w1,          y = h @ w2            both contiguous
    dgrad  dh = dy @ w2^T,      dx = dz @ w1^T        weight transposed
    wgrad  dw2 = h^T @ dy,      dw1 = x^T @ dz        activation transposed

How fast each runs depends on the backend: a BLAS may handle a transposed operand inside
`bmm` slowly but inside a plain `mm` well, or batch small problems badly. Every role
therefore runs in one of these forms, each the same products and the same sums:

    bmm             torch.bmm on the operands as they are (transposed views included)
    bmm_contiguous  torch.bmm after copying transposed operands into contiguous memory
    mm_loop         one torch.mm per expert into its slice of the output
    grouped         torch._grouped_mm, the fused grouped GEMM of CUDA sm90+ (bf16)

A plan names the form of each role. `plan_for` picks it by timing the candidate forms on
the real shapes at first use (cached per shape, dtype and device), or takes a forced form.
`bmm` is kept unless another form is at least SWITCH_MARGIN faster: on a shared 2-core machine
the same GEMM's timings spread by 5-15% from run to run, and picking by the bare minimum chose
per-expert `mm` for the forward in one of three runs, which made the layer 1.22x the dense FFN
instead of 1.09x with `bmm` (docs/PERFORMANCE.md). Where another form really wins it wins by far
more (3.5x for a weight gradient on a 2-core Xeon with AVX-512).
Given an `agree` reducer (distributed runs set one on their expert modules), the per-form
timings are combined over all ranks before the choice, so every rank picks the same plan;
plans agreed this way are cached apart from local ones. The measurement uses its own random
generator: choosing a plan never shifts the global random stream. This module imports
nothing from torch.distributed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

FORMS = ("bmm", "bmm_contiguous", "mm_loop", "grouped")
ROLES = ("fwd", "dgrad", "wgrad")
SWITCH_MARGIN = 0.10      # another form replaces bmm only when it takes < (1 - margin) x bmm's time


@dataclass(frozen=True)
class GemmPlan:
    """The GEMM form of each role (see the module docstring)."""

    fwd: str = "bmm"
    dgrad: str = "bmm"
    wgrad: str = "bmm"

    @classmethod
    def forced(cls, form: str) -> "GemmPlan":
        if form not in FORMS:
            raise ValueError(f"unknown expert GEMM form {form!r}; choose one of {', '.join(FORMS)} or 'auto'")
        return cls(form, form, form)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm is a candidate only where it is the fused kernel: CUDA sm90+ in bf16."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def batched_mm(a: torch.Tensor, b: torch.Tensor, form: str) -> torch.Tensor:
    """(E, m, k) @ (E, k, n) -> (E, m, n) in the given form; operands may be transposed views."""
    if form == "bmm":
        return torch.bmm(a, b)
    if form == "bmm_contiguous":
        return torch.bmm(a.contiguous(), b.contiguous())
    if form == "mm_loop":
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
        for e in range(a.shape[0]):
            torch.mm(a[e], b[e], out=out[e])
        return out
    if form == "grouped":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("expert GEMM form 'grouped' needs torch._grouped_mm (torch >= 2.8); "
                               "set moe.expert_gemm to auto or another form")
        return torch._grouped_mm(a, b)
    raise ValueError(f"unknown expert GEMM form {form!r}; choose one of {', '.join(FORMS)}")


class ExpertFFN(torch.autograd.Function):
    """y = GELU(x @ w1) @ w2 per expert, forward and backward in the forms of `plan`.

    The backward is the one autograd derives for bmm -> gelu -> bmm (same products, same
    operands, same GELU derivative), only the call form of each product changes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, plan: GemmPlan) -> torch.Tensor:
        z = batched_mm(x, w1, plan.fwd)                    # (E, T, f)
        h = F.gelu(z, approximate="tanh")                  # (E, T, f)
        ctx.save_for_backward(x, w1, w2, z, h)
        ctx.plan = plan
        return batched_mm(h, w2, plan.fwd)                 # (E, T, d)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w1, w2, z, h = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dx = dw1 = dw2 = None
        dy = dy.contiguous()
        if need_w2:
            dw2 = batched_mm(h.transpose(1, 2), dy, plan.wgrad)            # (E, f, d)
        if need_x or need_w1:
            dh = batched_mm(dy, w2.transpose(1, 2), plan.dgrad)            # (E, T, f)
            dz = torch.ops.aten.gelu_backward(dh, z, approximate="tanh")    # (E, T, f)
            if need_w1:
                dw1 = batched_mm(x.transpose(1, 2), dz, plan.wgrad)        # (E, d, f)
            if need_x:
                dx = batched_mm(dz, w1.transpose(1, 2), plan.dgrad)        # (E, T, d)
        return dx, dw1, dw2, None


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, plan: GemmPlan) -> torch.Tensor:
    """x (E, T, d), w1 (E, d, f), w2 (E, f, d) -> (E, T, d). Under autocast the products run in
    the autocast dtype (as torch.bmm would); the function itself runs with autocast off."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        with torch.autocast(dev, enabled=False):
            return ExpertFFN.apply(x, w1, w2, plan)
    return ExpertFFN.apply(x, w1, w2, plan)


# ---------------------------------------------------------------- selection at first use

_plans: dict[tuple, GemmPlan] = {}
_timings: dict[tuple, dict[str, dict[str, float]]] = {}
Agreement = Callable[[torch.Tensor], torch.Tensor]


def clear_cache() -> None:
    _plans.clear()
    _timings.clear()


def candidates(role: str, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    forms = ["bmm", "mm_loop"] if role == "fwd" else ["bmm", "bmm_contiguous", "mm_loop"]
    if grouped_mm_supported(device, dtype):
        forms.append("grouped")
    return tuple(forms)


def _role_operands(role: str, E: int, T: int, d: int, f: int, dtype, device):
    """The two products of a role, with operands in the layouts the function passes."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device, generator=gen)  # noqa: E731
    if role == "fwd":
        return [(r(E, T, d), r(E, d, f)), (r(E, T, f), r(E, f, d))]
    if role == "dgrad":
        return [(r(E, T, d), r(E, f, d).transpose(1, 2)), (r(E, T, f), r(E, d, f).transpose(1, 2))]
    return [(r(E, T, f).transpose(1, 2), r(E, T, d)), (r(E, T, d).transpose(1, 2), r(E, T, f))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(E: int, T: int, d: int, f: int, dtype: torch.dtype, device: torch.device,
            repeats: int = 2) -> dict[str, dict[str, float]]:
    """Seconds of each candidate form per role: both products of the role, the best of `repeats`
    rounds (the best discards the first touch of fresh memory), forms interleaved so that drift
    of a shared machine hits all alike."""
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for role in ROLES:
            forms = candidates(role, device, dtype)
            ops = _role_operands(role, E, T, d, f, dtype, device)
            best = {k: float("inf") for k in forms}
            for _ in range(repeats):
                for form in forms:
                    _sync(device)
                    t0 = time.perf_counter()
                    try:
                        for a, b in ops:
                            batched_mm(a, b, form)
                    except RuntimeError:      # e.g. grouped on strides it cannot take: never chosen
                        best[form] = float("inf")
                        continue
                    _sync(device)
                    best[form] = min(best[form], time.perf_counter() - t0)
            out[role] = best
    return out


def pick(seconds: dict[str, float]) -> str:
    """The form of one role from its timings: the fastest if it beats bmm by SWITCH_MARGIN, else bmm
    (the fastest outright where bmm was not timed or failed)."""
    best = min(seconds, key=seconds.get)                    # the first form wins a tie
    base = seconds.get("bmm", float("inf"))
    if base == float("inf") or seconds[best] < (1 - SWITCH_MARGIN) * base:
        return best
    return "bmm"


def plan_for(E: int, T: int, d: int, f: int, dtype: torch.dtype, device: torch.device,
             force: str = "auto", agree: Agreement | None = None) -> GemmPlan:
    """The plan for these shapes: `force` names one form for every role, 'auto' measures once.

    `agree` combines the 1-D float64 tensor of timings over ranks (a sum all-reduce) so that
    all choose alike. It runs on a cache miss, which every rank meets at the same expert call:
    expert choice gives every rank the same static expert shapes."""
    if force != "auto":
        return GemmPlan.forced(force)
    if device.type == "meta" or _get_current_dispatch_mode() is not None:
        # shapes only (meta / fake tensors) or an active mode such as a FLOP counter: nothing to
        # time, and timing would pollute what the mode records; the plain batched form, uncached
        return GemmPlan.forced("bmm")
    key = (E, T, d, f, dtype, str(device), agree is not None)
    plan = _plans.get(key)
    if plan is None:
        timings = measure(E, T, d, f, dtype, device)
        flat = [(role, form) for role in ROLES for form in timings[role]]
        vec = torch.tensor([timings[r][k] for r, k in flat], dtype=torch.float64)
        if agree is not None:
            vec = agree(vec).cpu()
        agreed = {role: {} for role in ROLES}
        for (role, form), t in zip(flat, vec.tolist()):
            agreed[role][form] = t
        choice = {role: pick(agreed[role]) for role in ROLES}
        plan = _plans[key] = GemmPlan(**choice)
        _timings[key] = agreed
    return plan


def chosen() -> dict[tuple, tuple[GemmPlan, dict[str, dict[str, float]]]]:
    """Every plan chosen so far by measurement, with the timings it was chosen from."""
    return {k: (p, _timings[k]) for k, p in _plans.items()}
