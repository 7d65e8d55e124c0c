"""Activation checkpointing: recompute each transformer block in the backward pass, except
its communication.

A checkpointed block keeps only its inputs and runs its forward again when backward needs
the activations. Rerunning the forward would repeat every collective in it: the
expert-parallel all-to-all (dispatch and combine of every MoE layer) and the gather of the
tensor-parallel token shares. Instead the exchanges keep their forward outputs and the
recompute reads them back (selective checkpointing of the exchanges): the backward pass
sends exactly what it sends without checkpointing.

The mechanism is the `context_fn` of non-reentrant checkpointing. Each checkpointed call
gets one `ExchangeStash`; while the block runs forward it records, in call order, the output
of every exchange that goes through `reuse_in_recompute`, and while the block is recomputed
it hands them back in the same order. Exchanges are plain-tensor autograd functions, so this
composes with FSDP2 (whose parameter all-gathers in recompute are its own business) and with
DTensor. What is still recomputed: the all-reduces DTensor issues inside row-parallel linear
layers (tensor parallelism), which do not pass through these functions.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

WRAPPER_PREFIX = "_checkpoint_wrapped_module."

_state = threading.local()          # the stash of the checkpointed block running in this thread
_live: "weakref.WeakSet[ExchangeStash]" = weakref.WeakSet()


class ExchangeStash:
    """Exchange outputs of one checkpointed block call, recorded in forward, replayed in order."""

    def __init__(self) -> None:
        self.saved: list[torch.Tensor] = []
        self.next = 0
        self.replaying = False
        _live.add(self)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.saved)


class _Use:
    def __init__(self, stash: ExchangeStash, replay: bool) -> None:
        self.stash, self.replay = stash, replay

    def __enter__(self):
        self.outer = getattr(_state, "stash", None)
        self.stash.replaying, self.stash.next = self.replay, 0
        _state.stash = self.stash
        return self

    def __exit__(self, *exc):
        _state.stash = self.outer
        return False


def exchange_contexts() -> tuple[_Use, _Use]:
    """`context_fn` of torch.utils.checkpoint: (record in forward, replay in recompute)."""
    stash = ExchangeStash()
    return _Use(stash, replay=False), _Use(stash, replay=True)


def reuse_in_recompute(exchange: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """exchange(*args) (a collective, called from an autograd function's forward), except in the
    recompute of a checkpointed block: there the output it had in forward, without communicating."""
    stash = getattr(_state, "stash", None)
    if stash is None:
        return exchange(*args)
    if stash.replaying:
        if stash.next >= len(stash.saved):
            raise RuntimeError("activation checkpointing: the recomputed block issued more exchanges than its "
                               "forward did (the block's forward must issue the same collectives every call)")
        stash.next += 1
        return stash.saved[stash.next - 1].detach()
    out = exchange(*args)
    stash.saved.append(out.detach())
    return out


def held_exchange_bytes() -> int:
    """Bytes of exchange outputs currently kept for recompute (all live checkpointed calls)."""
    return sum(s.nbytes() for s in list(_live))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every block of `model.blocks` (non-reentrant, composes with FSDP2 and DTensor); the
    exchanges inside a block keep their outputs for the recompute."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=exchange_contexts)


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes, identical on every layout."""
    return name.replace(WRAPPER_PREFIX, "").replace("_orig_mod.", "")
