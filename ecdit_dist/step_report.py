"""The one host read of a training step.

Everything the host must learn from a step (did any rank see a non-finite loss or gradient,
did any rank get a preemption signal, the loss, the gradient norm, the routing statistics of
a logging step) is packed into one small float32 tensor on the training device, summed over
all ranks by one all-reduce, and read by one `tolist()`. On a GPU that is the step's only
synchronisation: the host waits for the device once, after the backward pass and the
gradient norm and before the optimizer update, which it then applies or not.

Each entry is this rank's contribution to a sum over every rank. Flags are 0/1 per rank (a
total above 0 means "some rank"); a value that only one rank should report (a global
gradient norm, which every rank holds) is contributed by that rank and zero elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepReport:
    """Collects device scalars under names, then `read()`: one SUM all-reduce, one host read."""

    def __init__(self, device: torch.device, distributed: bool, group=None) -> None:
        self.device = device
        self.distributed = distributed
        self.group = group
        self._names: list[str] = []
        self._values: list[torch.Tensor] = []

    def add(self, name: str, value: torch.Tensor | float, contribute: bool = True) -> None:
        """This rank's share of `name` (a 0-dim tensor on the training device, or a number);
        `contribute=False` adds zero instead (another rank reports this value)."""
        if name in self._names:
            raise ValueError(f"step report entry {name!r} added twice")
        if not contribute:
            value = torch.zeros((), device=self.device)
        elif not isinstance(value, torch.Tensor):
            # a fill kernel, not a host-to-device copy (which would wait for the device)
            value = torch.full((), float(value), device=self.device)
        self._names.append(name)
        self._values.append(value.detach().reshape(()).to(self.device, torch.float32))

    def read(self) -> dict[str, float]:
        """Collective: the sum of every entry over all ranks, as Python floats."""
        if not self._names:
            return {}
        packed = torch.stack(self._values)
        if self.distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        values = packed.tolist()           # the step's one host read
        out = dict(zip(self._names, values))
        self._names, self._values = [], []
        return out
