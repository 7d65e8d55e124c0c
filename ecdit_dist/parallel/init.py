"""Weight initialisation that gives the same values on every layout and device.

Each unit of the network (the stem: patch embedding, timestep embedder, null text and final
layer; then every block) is initialised as a plain full-size CPU module, from a generator
seeded by (seed, unit) alone, and then copied into the model: into the local shard of every
distributed (DTensor) parameter, or into the whole of a plain one. So

- `train.init=full` (build everything, then shard) and `train.init=meta` (build on the meta
  device, shard, then fill) give the same weights bit for bit, on 1 rank or on N;
- CUDA and CPU runs start from the same weights (no device RNG, no DTensor RNG offsets);
- one unit at a time exists in full on the host (a block of the largest preset is a few GB),
  never the whole model.

Every rank generates every unit (each rank needs a shard of each); no collective runs.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from ecdit_dist.diffusion import sample_key
from ecdit_dist.parallel.ac import clean_fqn

_INIT_STREAM = 0x1417


def _reference_units(model: nn.Module, seed: int) -> Iterator[tuple[str, nn.Module]]:
    """(prefix, plain CPU module with the unit's initial weights) for the stem and each block."""
    from ecdit_dist.model import ECDiT
    from ecdit_dist.model.ecdit import ECDiTBlock

    mcfg, moe = model.config, model.moe_config
    with torch.device("meta"):
        stem = ECDiT(mcfg, moe)
    stem.blocks = nn.ModuleList()
    stem.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_key(seed, _INIT_STREAM, 0))
        stem.init_weights()
    yield "", stem
    for i in range(mcfg.num_layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_key(seed, _INIT_STREAM, i + 1))
            with torch.device("cpu"):
                block = ECDiTBlock(mcfg, moe, i)
            block.init_weights()
        yield f"blocks.{i}.", block


@torch.no_grad()
def _fill(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full value `full` into `target`: its local shard when it is a DTensor."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same full value: cut the local shard without communication
        local = target.to_local()
        local.copy_(distribute_tensor(full.to(local.device), target.device_mesh, target.placements,
                                      src_data_rank=None).to_local())
    else:
        target.copy_(full)


@torch.no_grad()
def init_from_seed(model: nn.Module, seed: int) -> None:
    """Initialise every parameter and buffer of an ECDiT (plain or parallelized, on any device,
    after `to_empty()` for a meta-built one) to the layout-independent values of `seed`."""
    params = {clean_fqn(n): p for n, p in model.named_parameters()}
    buffers = {clean_fqn(n): b for n, b in model.named_buffers()}
    seen = set()
    for prefix, unit in _reference_units(model, seed):
        for kind, own, targets in (("parameter", unit.named_parameters(), params),
                                   ("buffer", unit.named_buffers(), buffers)):
            for name, full in own:
                key = prefix + name
                if key not in targets:
                    raise KeyError(f"initialisation: the model has no {kind} {key}")
                _fill(targets[key], full)
                seen.add(key)
        del unit
    left = sorted(set(params) - seen)
    if left:
        raise KeyError(f"initialisation left parameters untouched: {left}")
