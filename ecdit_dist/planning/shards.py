"""Per-rank parameter shards of a layout: what every rank stores, without building the layout.

The rules are those of `ecdit_dist.parallel` (and are tested against it, on real gloo ranks and
on the fake process group at full scale):

* tensor parallel: the module paths of `tp.block_plan` are split column-wise (weight and bias
  along dim 0) or row-wise (weight along dim 1, bias replicated);
* expert parallel: `experts.w1` / `experts.w2` keep num_experts / ep experts (dim 0);
* ZeRO-3 (FSDP2): dense tensors are chunked along dim 0 over dp_shard, expert tensors along
  dim 1 over the expert-data-parallel ranks (edp), like `torch.chunk`: rank i holds rows
  [i*c, (i+1)*c) with c = ceil(n / ranks), so rank 0 always holds the largest shard (and every
  rank allocates c rows, the padded size). dp_replicate keeps full copies of those shards.

`measure_shards` builds the real thing on the meta device under torch's fake process group, so
one process plays any rank of any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ecdit_dist.config import Config
from ecdit_dist.parallel.dims import ParallelDims


@dataclass(frozen=True)
class ParamInfo:
    name: str                 # clean name, as in checkpoints
    shape: tuple[int, ...]    # global shape
    unit: str                 # FSDP unit: "root", "block<i>" or "experts<i>"
    tp_dim: int | None        # dimension split over tp (None: replicated over tp)
    expert: bool              # split over ep along dim 0, ZeRO-3 over edp along dim 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def inventory(cfg: Config) -> list[ParamInfo]:
    """Every parameter of the model with its global shape and how the layout splits it
    (the model is built on the meta device: no memory, any size)."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from ecdit_dist.model import ECDiT
    from ecdit_dist.parallel.tp import block_plan

    with torch.device("meta"):
        model = ECDiT(cfg.model, cfg.moe)
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] != "blocks":
            out.append(ParamInfo(name, tuple(p.shape), "root", None, False))
            continue
        i, local = int(parts[1]), ".".join(parts[2:])
        if ".experts." in f".{local}":
            out.append(ParamInfo(name, tuple(p.shape), f"experts{i}", None, True))
            continue
        module, leaf = local.rsplit(".", 1)
        style = block_plan(model.blocks[i].is_moe).get(module)
        tp_dim = None
        if style is not None:
            if isinstance(style, ColwiseParallel):
                tp_dim = 0
            elif leaf == "weight":
                tp_dim = 1          # row-wise weight; a row-wise bias stays replicated
        out.append(ParamInfo(name, tuple(p.shape), f"block{i}", tp_dim, False))
    return out


def _chunk_rows(n: int, ranks: int, index: int) -> int:
    """Rows of a length-n dimension that `torch.chunk(ranks)` gives to chunk `index`."""
    c = -(-n // ranks)
    return max(0, min(c, n - index * c))


def local_shape(info: ParamInfo, dims: ParallelDims, rank: int = 0, padded: bool = False) -> tuple[int, ...]:
    """Shape of the local shard `rank` holds (padded=True: the chunk FSDP allocates on every rank)."""
    shape = list(info.shape)
    if dims.world == 1:
        return tuple(shape)
    co = dims.coords(rank)
    if info.expert:
        if dims.ep > 1:
            shape[0] //= dims.ep
        ranks, index, dim = dims.edp, co["edp"], 1
    else:
        if dims.tp > 1 and info.tp_dim is not None:
            shape[info.tp_dim] //= dims.tp
        ranks, index, dim = dims.dp_shard, co["dp_shard"], 0
    shape[dim] = -(-shape[dim] // ranks) if padded else _chunk_rows(shape[dim], ranks, index)
    return tuple(shape)


def local_numels(params: list[ParamInfo], dims: ParallelDims, rank: int = 0) -> dict[str, int]:
    return {p.name: math.prod(local_shape(p, dims, rank)) for p in params}


def unit_numels(params: list[ParamInfo], dims: ParallelDims) -> dict[str, int]:
    """Elements of each FSDP unit once gathered on a rank (its tp / ep slice, all dp shards)."""
    units: dict[str, int] = {}
    for p in params:
        shape = list(p.shape)
        if p.expert and dims.ep > 1:
            shape[0] //= dims.ep
        if not p.expert and dims.tp > 1 and p.tp_dim is not None:
            shape[p.tp_dim] //= dims.tp
        units[p.unit] = units.get(p.unit, 0) + math.prod(shape)
    return units


def measure_shards(cfg: Config, world: int, rank: int = 0) -> dict[str, tuple[int, ...]]:
    """Local parameter shapes of `rank` in the real parallelized model, built on the meta device
    under torch's fake process group (no communication, no memory). Needs a process without a
    process group; leaves none behind."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ecdit_dist.model import ECDiT
    from ecdit_dist.parallel.ac import clean_fqn
    from ecdit_dist.parallel.parallelize import parallelize

    if dist.is_initialized():
        raise RuntimeError("measure_shards needs a process without a process group")
    dims = ParallelDims.from_config(cfg, world)
    if world == 1:
        with torch.device("meta"):
            model = ECDiT(cfg.model, cfg.moe)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims.build_meshes()
        with torch.device("meta"):
            model = ECDiT(cfg.model, cfg.moe)
        parallelize(model, dims, cfg)
        return {clean_fqn(n): tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape)
                for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
