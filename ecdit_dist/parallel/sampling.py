"""Sampling during distributed training with the sharded model itself.

Every rank runs the same prompts, noise and steps through the parallelized model (its
forward is collective: FSDP gathers, tensor-parallel reductions, expert all-to-alls), so no
rank builds a full copy of a large model and no rank waits at a barrier while another one
samples. Under tensor parallelism each MoE layer routes a contiguous 1/tp share of the
tokens on each tp rank; `generate(..., token_split=tp)` pads the batch so that every share
holds whole routing groups, the groups of one process. Only the first rank writes the grid.
The EMA weights are swapped in for the duration and swapped back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ecdit_dist.parallel.ac import clean_fqn


@contextlib.contextmanager
@torch.no_grad()
def ema_weights(model: nn.Module, ema) -> Iterator[None]:
    """Temporarily load the EMA weights into `model` (shard by shard); None = leave as is."""
    if ema is None:
        yield
        return
    params = [p for n, p in model.named_parameters() if clean_fqn(n) in ema.shadow]
    saved = [p.detach().clone() for p in params]
    ema.copy_to(model)
    try:
        yield
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def sample_with_peers(model: nn.Module, text_encoder, decode, prompts: list[str], per_prompt: int, steps: int,
                      cfg_scale: float, seed: int, path, autocast_dtype: torch.dtype | None = None,
                      token_split: int = 1) -> None:
    """What `ecdit_dist.sample.sample_grid` computes on the first rank, on another rank: the same
    forward passes (they are collective), without decoding or writing anything."""
    from ecdit_dist.sample import generate

    texts = [p for p in prompts for _ in range(per_prompt)]
    emb, mask = text_encoder.encode(texts)
    generate(model, emb, mask, steps, cfg_scale, seed, autocast_dtype, token_split)
