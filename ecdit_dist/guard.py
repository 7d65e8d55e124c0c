"""The non-finite guard: a step whose loss or gradients are not finite on any rank is not applied.

Every step, each rank notes "my loss or my gradient norm is not finite" as a 0/1 entry of the
step's report (ecdit_dist/step_report.py): one all-reduce of one small tensor, read once by
the host before the optimizer update, makes the verdict every rank's (together with the
preemption flag, the loss and the gradient norm). One rank's NaN is everyone's, so every
rank skips, stops or rolls back at the
same step. Policies (`train.on_nonfinite`):

- skip: the update is not applied (weights, optimizer state and EMA untouched) and the step
  is counted; after `train.nonfinite_patience` consecutive skipped steps the run stops.
- stop: the run stops at the first non-finite step.
- rollback: the newest checkpoint is loaded again and the data window since it (the batches
  up to and including the offending one) is skipped; after `train.nonfinite_patience`
  rollbacks without a finite step in between the run stops.

A stop raises NonFiniteError on every rank, naming the step and the first non-finite
tensor (its name and the rank that holds it). Checkpoints are only written from finite
weights (`weights_finite`, agreed across ranks the same way).

Outside the step (the finiteness of the weights before a checkpoint) `agree` is a 1-element
all-reduce of its own.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training produced non-finite values and the policy says stop."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: every element of every (local shard of a)
    tensor is finite. No host synchronisation."""
    flags = [torch.isfinite(_local(t)).all() for t in tensors if _local(t).numel()]
    if not flags:
        return torch.ones((), dtype=torch.bool)
    dev = flags[0].device
    return torch.stack([f.to(dev) for f in flags]).all()


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor (of this rank's shards) holding a NaN or an infinity."""
    for name, t in named:
        if t is not None and _local(t).numel() and not bool(torch.isfinite(_local(t)).all()):
            return name
    return None


class NonFiniteGuard:
    """Agreement on finiteness across all ranks, and the policy's bookkeeping."""

    def __init__(self, policy: str, patience: int, device: torch.device, world: int) -> None:
        if policy not in ("skip", "stop", "rollback"):
            raise ValueError(f"unknown non-finite policy {policy!r}")
        self.policy = policy
        self.patience = patience
        self.device = device
        self.world = world
        self.skipped_total = 0       # steps whose update was not applied
        self.consecutive = 0         # skipped steps since the last finite one
        self.rollbacks = 0           # rollbacks since the last finite step

    def agree(self, finite_here: torch.Tensor) -> bool:
        """Collective: True on every rank iff `finite_here` is true on every rank."""
        bad = (~finite_here.to(self.device, torch.bool)).to(torch.int32).reshape(1)   # (1,)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def nonfinite_here(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """This rank's entry of the step report: 1.0 if its loss or the gradient norm is not finite,
        else 0.0 (a 0-dim float tensor on the training device; no host synchronisation)."""
        return (~all_finite([loss.detach(), grad_norm.detach()]).to(self.device)).float()

    @staticmethod
    def verdict(nonfinite_ranks: float) -> bool:
        """The step is finite everywhere: the all-rank sum of `nonfinite_here` is 0 (NaN counts as not)."""
        return nonfinite_ranks == 0

    def record_finite(self) -> None:
        self.consecutive = 0
        self.rollbacks = 0

    def culprit(self, rank: int, named: Iterable[tuple[str, torch.Tensor | None]]) -> str:
        """Collective (only after a non-finite verdict): 'NAME on rank R' for the lowest rank that
        holds a non-finite tensor among `named` (e.g. the loss, then every gradient)."""
        name = first_nonfinite(named)
        if self.world == 1:
            return f"{name}" if name else "an intermediate value (no tensor of this rank is non-finite)"
        first = torch.tensor([rank if name is not None else self.world], dtype=torch.int64, device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        src = int(first.item())
        if src >= self.world:
            return "an intermediate value (no rank holds a non-finite tensor)"
        box = [name]
        dist.broadcast_object_list(box, src=src)
        return f"{box[0]} on rank {src}"

    def on_nonfinite(self, step: int, describe) -> str:
        """Bookkeeping after a non-finite verdict; returns the action ("skip" or "rollback") or raises
        NonFiniteError (on every rank: the verdict and the counters are the same everywhere).
        `describe()` is the collective that names the culprit; it is called on every rank."""
        self.skipped_total += 1
        self.consecutive += 1
        where = describe()
        if self.policy == "stop":
            raise NonFiniteError(f"step {step}: non-finite loss or gradient (first non-finite tensor: {where}); "
                                 f"train.on_nonfinite=stop. Lower optim.lr, check the data, or use skip/rollback")
        if self.policy == "skip" and self.consecutive >= self.patience:
            raise NonFiniteError(f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                                 f"gradient (first non-finite tensor: {where}); stopping after "
                                 f"train.nonfinite_patience={self.patience}. Lower optim.lr or check the data")
        if self.policy == "rollback":
            self.rollbacks += 1
            if self.rollbacks > self.patience:
                raise NonFiniteError(f"step {step}: still non-finite after {self.rollbacks - 1} rollbacks "
                                     f"(first non-finite tensor: {where}); train.nonfinite_patience="
                                     f"{self.patience}. Lower optim.lr or check the data")
            return "rollback"
        return "skip"
