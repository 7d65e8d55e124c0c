"""Where the time of a training step goes: exclusive per-phase timers.

Phases open and close at module boundaries in the forward pass (module hooks) and at tensor
boundaries in the backward pass (gradient hooks: the gradient of a phase's output arrives
when its backward starts, the gradient of its input when it ends). The timer keeps a stack
of open phases and logs one mark per transition; the time between two marks belongs to the
innermost phase open then, or to `other` when none is. So nested or overlapping phases are
never counted twice and the phases plus `other` add up to the step exactly.

Marks are CUDA events on GPU, recorded in stream order and read only when the metrics are
collected (no synchronisation inside the step), and the monotonic clock on CPU. On GPU a
phase's time is the time the compute stream spends on it, including waits on other streams
(an FSDP all-gather that is not hidden by prefetching shows up as `fsdp_gather`).

Phases (forward and backward summed):
    attention     self- and cross-attention (with their tensor-parallel all-reduces)
    route         router logits, softmax and top-C per expert
    dispatch_a2a  the expert-parallel all-to-all to the expert owners (and its backward)
    experts       the batched expert matmuls
    combine_a2a   the all-to-all back (and its backward)
    fsdp_gather   ZeRO-3 all-gathers of weights (issue and wait), forward and backward
    fsdp_reduce   ZeRO-3 reduce-scatters of gradients and their final wait
    optimizer     optimizer.step()
The model is not modified: everything is hooks added from outside, after `parallelize`.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn as nn

from ecdit_dist.model.attention import CrossAttention, SelfAttention
from ecdit_dist.model.moe import ExpertChoiceMoE, GroupedExperts

PHASES = ("attention", "route", "dispatch_a2a", "experts", "combine_a2a", "fsdp_gather", "fsdp_reduce", "optimizer")


class PhaseTimer:
    """Stack of open phases and a log of transition marks; `collect` turns the logged steps
    into mean seconds per phase. Inactive outside begin_step() / end_step() (hooks cost a
    flag test then). With `trace` on, every phase is also a torch.profiler record_function range."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.active = False
        self.trace = False
        self._stack: list[tuple[str, Any, Any]] = []          # (phase, key, record_function or None)
        self._marks: list[tuple[Any, str | None]] = []        # (event or seconds, phase of the interval after)
        self._steps: list[list[tuple[Any, str | None]]] = []

    def _mark(self) -> None:
        if self.cuda:
            now: Any = torch.cuda.Event(enable_timing=True)
            now.record()
        else:
            now = time.perf_counter()
        self._marks.append((now, self._stack[-1][0] if self._stack else None))

    def start(self, phase: str, key: Any, name: str | None = None) -> None:
        if not self.active:
            return
        rf = None
        if self.trace:
            rf = torch.profiler.record_function(name or phase)
            rf.__enter__()
        self._stack.append((phase, key, rf))
        self._mark()

    def stop(self, phase: str, key: Any) -> None:
        if not self.active:
            return
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == phase and self._stack[i][1] == key:
                rf = self._stack.pop(i)[2]
                if rf is not None:
                    rf.__exit__(None, None, None)
                self._mark()
                return

    def begin_step(self) -> None:
        self._stack.clear()
        self._marks = []
        self.active = True
        self._mark()

    def end_step(self) -> None:
        self._mark()
        self.active = False
        for _, _, rf in reversed(self._stack):
            if rf is not None:
                rf.__exit__(None, None, None)
        self._stack.clear()
        self._steps.append(self._marks)
        self._marks = []

    def collect(self) -> tuple[dict[str, float], float] | None:
        """(mean seconds per phase incl. `other`, mean step seconds) over the steps since the
        last collect; None if there were none. On GPU this waits for the last step's events."""
        steps, self._steps = self._steps, []
        if not steps:
            return None
        if self.cuda:
            steps[-1][-1][0].synchronize()
        totals: dict[str, float] = defaultdict(float)
        step_total = 0.0
        for marks in steps:
            for (t0, label), (t1, _) in zip(marks, marks[1:]):
                dt = t0.elapsed_time(t1) / 1000.0 if self.cuda else t1 - t0
                totals[label if label in PHASES else "other"] += dt
            first, last = marks[0][0], marks[-1][0]
            step_total += first.elapsed_time(last) / 1000.0 if self.cuda else last - first
        n = len(steps)
        return {k: v / n for k, v in totals.items()}, step_total / n


def _on_grads(timer: PhaseTimer, phase: str, key: Any, name: str, begins: torch.Tensor,
              ends: torch.Tensor) -> None:
    """Backward of a phase: it starts when `begins` gets its gradient and ends when `ends` does."""
    if not (torch.is_tensor(begins) and torch.is_tensor(ends) and begins.requires_grad and ends.requires_grad):
        return
    if not timer.active or not torch.is_grad_enabled():
        return
    bkey = (key, "bwd")
    begins.register_hook(lambda g: (timer.start(phase, bkey, name + "@bwd"), g)[1])
    ends.register_hook(lambda g: (timer.stop(phase, bkey), g)[1])


def _time_module(module: nn.Module, phase: str, name: str, timer: PhaseTimer, inner: bool = False) -> None:
    """Forward and backward of `module` (input = first positional argument). `inner`: run inside
    the module's other hooks (after its pre-hooks, before its post-hooks)."""
    key = id(module)
    seen: dict[str, torch.Tensor] = {}

    def pre(m, args):
        timer.start(phase, key, name)
        if args and torch.is_tensor(args[0]):
            seen["x"] = args[0]

    def post(m, args, out):
        timer.stop(phase, key)
        x = seen.pop("x", None)
        if x is not None and torch.is_tensor(out):
            _on_grads(timer, phase, key, name, out, x)

    module.register_forward_pre_hook(pre, prepend=not inner)
    module.register_forward_hook(post, prepend=inner)


def _wrap_hooks(experts: nn.Module, timer: PhaseTimer, layer: str) -> None:
    """Time the expert-parallel dispatch / combine hooks in place (they carry `profile_phase`)."""
    for hooks, is_pre in ((experts._forward_pre_hooks, True), (experts._forward_hooks, False)):
        for hid, fn in list(hooks.items()):
            phase = getattr(fn, "profile_phase", None)
            if phase is None:
                continue
            key, name = (id(experts), phase), f"{layer}/{phase}"
            if is_pre:
                def wrapped(m, args, fn=fn, phase=phase, key=key, name=name):
                    timer.start(phase, key, name)
                    out = fn(m, args)
                    timer.stop(phase, key)
                    if out is not None:
                        _on_grads(timer, phase, key, name, out[0], args[0])
                    return out
            else:
                def wrapped(m, args, result, fn=fn, phase=phase, key=key, name=name):
                    timer.start(phase, key, name)
                    out = fn(m, args, result)
                    timer.stop(phase, key)
                    if out is not None:
                        _on_grads(timer, phase, key, name, out, result)
                    return out
            hooks[hid] = wrapped


def _wrap_method(obj: Any, method: str, phase: str, timer: PhaseTimer, name: str) -> None:
    fn = getattr(obj, method)
    key = (id(obj), method)

    def wrapped(*args, **kwargs):
        timer.start(phase, key, name)
        try:
            return fn(*args, **kwargs)
        finally:
            timer.stop(phase, key)

    setattr(obj, method, wrapped)


def _time_fsdp(model: nn.Module, timer: PhaseTimer) -> None:
    """ZeRO-3 collectives: the FSDP2 parameter groups' unshard / wait and reduce-scatter steps."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    names = {m: n for n, m in model.named_modules()}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        groups = getattr(m._get_fsdp_state(), "_fsdp_param_groups", None)
        if groups is None:
            warnings.warn("this torch version's FSDP2 hides its parameter groups: fsdp_gather / fsdp_reduce "
                          "are counted as `other`", stacklevel=2)
            return
        label = names.get(m, "") or "model"
        for pg in groups:
            for method, phase in (("unshard", "fsdp_gather"), ("wait_for_unshard", "fsdp_gather"),
                                  ("post_backward", "fsdp_reduce"), ("finalize_backward", "fsdp_reduce")):
                if hasattr(pg, method):
                    _wrap_method(pg, method, phase, timer, f"{label}/{phase}")


def layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """Every submodule of block i -> 'layer{i}'."""
    out: dict[nn.Module, str] = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        for m in block.modules():
            out[m] = f"layer{i}"
    return out


def instrument(model: nn.Module, timer: PhaseTimer, optimizer: torch.optim.Optimizer | None = None,
               route_observer: Callable[[nn.Module, torch.Tensor, int], None] | None = None,
               timing: bool = True) -> None:
    """Add the phase hooks. Call after `parallelize` (the all-to-all and FSDP hooks must exist).
    `route_observer(layer, rows, num_tokens)` sees every expert-choice routing decision;
    `timing=False` installs only that."""
    layers = layer_names(model)
    for m in model.modules():
        layer = layers.get(m, "model")
        if isinstance(m, (SelfAttention, CrossAttention)) and timing:
            _time_module(m, "attention", f"{layer}/attention", timer)
        elif isinstance(m, GroupedExperts) and timing:
            _wrap_hooks(m, timer, layer)
            _time_module(m, "experts", f"{layer}/experts", timer, inner=True)
        elif isinstance(m, ExpertChoiceMoE):
            route = m.route

            def timed_route(groups, capacity, route=route, m=m, name=f"{layer}/route"):
                timer.start("route", id(m), name)
                try:
                    gate, rows = route(groups, capacity)
                finally:
                    timer.stop("route", id(m))
                if route_observer is not None:
                    route_observer(m, rows, groups.shape[0] * groups.shape[1])
                return gate, rows

            m.route = timed_route
    if not timing:
        return
    for i, block in enumerate(getattr(model, "blocks", [])):       # layer ranges in traces (time: `other`)
        block.register_forward_pre_hook(lambda m, a, i=i: timer.start("layer", id(m), f"layer{i}"), prepend=True)
        block.register_forward_hook(lambda m, a, o: timer.stop("layer", id(m)))
    _time_fsdp(model, timer)
    if optimizer is not None:
        optimizer.register_step_pre_hook(lambda opt, a, k: timer.start("optimizer", id(opt), "optimizer"))
        optimizer.register_step_post_hook(lambda opt, a, k: timer.stop("optimizer", id(opt)))


def metrics(collected: tuple[dict[str, float], float] | None) -> dict[str, float]:
    """`time/<phase>_ms` and `time/<phase>_share` for every phase and `other`, and `time/step_ms`."""
    if collected is None:
        return {}
    seconds, step = collected
    out: dict[str, float] = {}
    for p in (*PHASES, "other"):
        s = seconds.get(p, 0.0)
        out[f"time/{p}_ms"] = 1000.0 * s
        out[f"time/{p}_share"] = s / step if step > 0 else 0.0
    out["time/step_ms"] = 1000.0 * step
    return out
