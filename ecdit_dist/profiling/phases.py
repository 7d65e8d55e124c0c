"""Wall-clock split of a training step into attention / route / all-to-all / experts / other.

Forward phases are timed with module hooks; backward phases with gradient hooks on the
tensors at each phase boundary (the gradient of a phase's output arrives when its
backward starts, the gradient of its input when it ends). The clocks are host clocks:
exact on CPU, and on CUDA only with `sync=True` (which serialises the GPU).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

from ecdit_dist.model.attention import CrossAttention, SelfAttention
from ecdit_dist.model.moe import ExpertChoiceMoE, GroupedExperts


class PhaseTimes:
    def __init__(self, sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync and torch.cuda.is_available()
        self._open: dict[tuple[str, int], float] = {}

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, phase: str, key: int) -> None:
        self._open[(phase, key)] = self.now()

    def stop(self, phase: str, key: int) -> None:
        t0 = self._open.pop((phase, key), None)
        if t0 is not None:
            self.seconds[phase] += self.now() - t0

    def reset(self) -> None:
        self.seconds.clear()
        self._open.clear()


def _grad_hook(tensor: torch.Tensor, fn: Callable[[], None]) -> None:
    if tensor.requires_grad:
        tensor.register_hook(lambda g: (fn(), g)[1])


def _time_module(module: nn.Module, phase: str, times: PhaseTimes) -> None:
    """Forward and backward of `module` (input x = first positional argument) into `phase`."""
    key = id(module)

    def pre(m, args):
        times.start(phase, key)
        _grad_hook(args[0], lambda: times.stop(phase + "@bwd", key))

    def post(m, args, out):
        times.stop(phase, key)
        _grad_hook(out, lambda: times.start(phase + "@bwd", key))

    module.register_forward_pre_hook(pre, prepend=True)
    module.register_forward_hook(post, prepend=True)


def _time_all_to_all(experts: nn.Module, times: PhaseTimes) -> None:
    """The dispatch/combine hooks of expert parallelism sit around `experts`: time them too."""
    key = id(experts)

    def before_dispatch(m, args):
        times.start("all_to_all", key)
        _grad_hook(args[0], lambda: times.stop("all_to_all@bwd", key))

    def after_dispatch(m, args):
        times.stop("all_to_all", key)
        _grad_hook(args[0], lambda: times.start("all_to_all@bwd", key))

    def before_combine(m, args, out):
        times.start("all_to_all", key + 1)
        _grad_hook(out, lambda: times.stop("all_to_all@bwd", key + 1))

    def after_combine(m, args, out):
        times.stop("all_to_all", key + 1)
        _grad_hook(out, lambda: times.start("all_to_all@bwd", key + 1))

    experts.register_forward_pre_hook(before_dispatch, prepend=True)
    experts.register_forward_pre_hook(after_dispatch)
    experts.register_forward_hook(before_combine, prepend=True)
    experts.register_forward_hook(after_combine)


def instrument(model: nn.Module, times: PhaseTimes, expert_parallel: bool) -> None:
    """Call after `parallelize` (the all-to-all hooks must already be in place)."""
    for m in model.modules():
        if isinstance(m, (SelfAttention, CrossAttention)):
            _time_module(m, "attention", times)
        elif isinstance(m, GroupedExperts):
            if expert_parallel:
                _time_all_to_all(m, times)
            # inner hooks: registered last among pre-hooks and first among post-hooks below
            key = id(m) + 2

            def pre(mod, args, key=key):
                times.start("experts", key)
                _grad_hook(args[0], lambda: times.stop("experts@bwd", key))

            def post(mod, args, out, key=key):
                times.stop("experts", key)
                _grad_hook(out, lambda: times.start("experts@bwd", key))

            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post, prepend=True)
        elif isinstance(m, ExpertChoiceMoE):
            route = m.route

            def timed_route(groups, capacity, route=route, key=id(m)):
                times.start("route", key)
                try:
                    return route(groups, capacity)
                finally:
                    times.stop("route", key)

            m.route = timed_route


def summary(times: PhaseTimes, step_seconds: float) -> dict[str, float]:
    """Seconds per phase (forward + backward) and `other` = the rest of the step."""
    phases = ("attention", "route", "all_to_all", "experts")
    out = {p: times.seconds.get(p, 0.0) + times.seconds.get(p + "@bwd", 0.0) for p in phases}
    out["other"] = max(0.0, step_seconds - sum(out.values()))
    out["step"] = step_seconds
    return out
