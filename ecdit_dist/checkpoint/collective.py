"""Collective outcomes for checkpoint work, over CPU (gloo) process groups of their own.

Checkpoint work is rank-local (hashing, writing meta.json, uploading, verifying), but its
outcome must be everyone's: a rank that fails while the others wait at a barrier leaves them
waiting for the collective timeout. `Dist.agree(what, fn)` runs `fn` on this rank, then
exchanges every rank's outcome (one all_gather_object on the group): when any rank raised,
every rank raises the same CheckpointError naming the failing rank(s) and the cause, as soon
as the slowest healthy rank arrives, not after a timeout.

The groups are CPU-capable (gloo) whatever the training backend, with their own long
timeout (`checkpoint.timeout_s`): long single-rank work (hashing hundreds of GB, an upload)
is waited for here, not inside an NCCL barrier whose watchdog would abort the job. A second
group carries only the background (async) save, so its collectives never interleave with the
ones of the training thread.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable, TypeVar

from ecdit_dist.checkpoint.errors import CheckpointError

T = TypeVar("T")


def failure_types() -> tuple[type[BaseException], ...]:
    """What rank-local checkpoint work may raise: ordinary exceptions and DCP's CheckpointException
    (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def describe_error(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, CheckpointError) else f"{type(e).__name__}: {text}"


class Dist:
    """The few collectives the checkpoint manager needs; Dist() is one process (no communication)."""

    def __init__(self, group=None, rank: int = 0, world: int = 1) -> None:
        self.group = group
        self.rank = rank
        self.world = world

    @classmethod
    def create(cls, timeout_s: float) -> "Dist":
        """A new gloo group over all ranks (collective: every rank calls this in the same order)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls()
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(group, dist.get_rank(), dist.get_world_size())

    # ------------------------------------------------------------------ primitives
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        self.gather(None)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff `ok` on every rank."""
        return all(self.gather(bool(ok)))

    # ------------------------------------------------------------------ agreement
    def agree(self, what: str, fn: Callable[[], T], on: int | None = None) -> T | None:
        """Run `fn` (on every rank, or only on rank `on`), then agree on the outcome: the same
        CheckpointError on every rank when any rank raised. Returns this rank's result."""
        result, failure = None, None
        if on is None or on == self.rank:
            try:
                result = fn()
            except failure_types() as e:   # reported on every rank below
                failure = e
        if self.world == 1:
            if failure is not None:
                if isinstance(failure, CheckpointError):
                    raise failure
                raise CheckpointError(f"{what} failed: {describe_error(failure)}") from failure
            return result
        outcomes = self.gather(None if failure is None else f"{describe_error(failure)} (on {socket.gethostname()}, "
                                                            f"pid {os.getpid()})")
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if failed:
            where = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise CheckpointError(f"{what} failed on {len(failed)} of {self.world} ranks ({where})") from failure
        return result
