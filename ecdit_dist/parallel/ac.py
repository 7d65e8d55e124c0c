"""Activation checkpointing: recompute each transformer block in the backward pass."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every block of `model.blocks` (non-reentrant, composes with FSDP2 and DTensor)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes, identical on every layout."""
    return name.replace(WRAPPER_PREFIX, "").replace("_orig_mod.", "")
