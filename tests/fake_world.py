"""Parallelize a config's model on the meta device as rank 0 of the config's stated world,
with torch's fake process group (every collective is a no-op, nothing is allocated), and
print what rank 0 holds as JSON. Run as a script: one process group per process.

    python tests/fake_world.py configs/paper/ecdit-m-64e.yaml [...]
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from ecdit_dist.config import load_config
from ecdit_dist.model import ECDiT
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.parallel.parallelize import parallelize


def local_numel(p: torch.Tensor) -> int:
    return (p.to_local() if hasattr(p, "to_local") else p).numel()


def rank0_view(path: str) -> dict:
    cfg = load_config(path)
    world = cfg.parallel.world_size
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        dims = ParallelDims.from_config(cfg, world)
        dims.build_meshes()
        with torch.device("meta"):
            model = ECDiT(cfg.model, cfg.moe)
        parallelize(model, dims, cfg)
        experts = {}
        for name, p in model.named_parameters():
            if name.endswith(("experts.w1", "experts.w2")) and not experts:
                experts = {"global": list(p.shape), "local": list(p.to_local().shape),
                           "mesh": list(p.device_mesh.mesh_dim_names), "mesh_shape": list(p.device_mesh.shape)}
        w = model.blocks[0].attn
        dense = next(p for p in w.parameters())
        return {
            "world": world, "edp": dims.edp,
            "local_params": sum(local_numel(p) for p in model.parameters()),
            "global_params": sum(p.numel() for p in model.parameters()),
            "expert": experts,
            "dense": {"global": list(dense.shape), "local": list(dense.to_local().shape),
                      "mesh": list(dense.device_mesh.mesh_dim_names)},
        }
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    print(json.dumps({path: rank0_view(path) for path in sys.argv[1:]}))
