"""The process layout: data, tensor and expert parallel degrees and their device meshes.

world = dp_replicate x dp_shard x tp, tp innermost. Attention and dense FFNs are split
over `tp` and ZeRO-3 sharded over the data-parallel dims. Expert-parallel groups are
drawn from dp_shard x tp ("parallel folding"): that block of ranks is re-read as
(edp, ep) with ep innermost, so an ep group is ep consecutive ranks. Expert weights are
split over `ep` and ZeRO-3 sharded over the expert-data-parallel ranks
(dp_replicate x edp = world / ep).

Everything is validated before any process group exists, with messages that say what to
change; a degree of 1 creates no communication at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ecdit_dist.config import Config, ConfigError


@dataclass
class ParallelDims:
    world: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    device_type: str = "cpu"
    meshes: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ validation
    @classmethod
    def from_config(cls, cfg: Config, world: int, device_type: str = "cpu") -> "ParallelDims":
        p = cfg.parallel
        if world < 1:
            raise ConfigError(f"world size must be >= 1, got {world}")
        if p.world_size is not None and p.world_size != world:
            raise ConfigError(
                f"this layout was written for parallel.world_size={p.world_size} ranks, but {world} were started; "
                f"start {p.world_size} ranks, or adapt the degrees and set parallel.world_size={world} (or null)")
        if world % (p.dp_replicate * p.tp):
            raise ConfigError(
                f"world size {world} is not divisible by parallel.dp_replicate x parallel.tp = "
                f"{p.dp_replicate} x {p.tp}; choose degrees whose product divides {world}")
        dp_shard = p.dp_shard if p.dp_shard != -1 else world // (p.dp_replicate * p.tp)
        if p.dp_replicate * dp_shard * p.tp != world:
            raise ConfigError(
                f"parallel.dp_replicate x parallel.dp_shard x parallel.tp = {p.dp_replicate} x {dp_shard} x {p.tp} "
                f"= {p.dp_replicate * dp_shard * p.tp}, but the world size is {world}; set parallel.dp_shard="
                f"{world // (p.dp_replicate * p.tp) if world % (p.dp_replicate * p.tp) == 0 else '?'} or -1 (auto)")
        dims = cls(world=world, dp_replicate=p.dp_replicate, dp_shard=dp_shard, tp=p.tp, ep=p.ep,
                   device_type=device_type)
        dims.validate(cfg)
        return dims

    def validate(self, cfg: Config) -> None:
        m, moe = cfg.model, cfg.moe
        tp, ep = self.tp, self.ep
        for name, n in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.num_kv_heads),
                        ("model.cross_kv_heads", m.cross_kv_heads or m.num_heads)):
            if n % tp:
                raise ConfigError(f"{name} ({n}) must be divisible by parallel.tp ({tp}); valid tp: "
                                  f"{[d for d in range(1, n + 1) if n % d == 0]}")
        if m.ffn_hidden % tp:
            raise ConfigError(f"the FFN width {m.ffn_hidden} must be divisible by parallel.tp ({tp})")
        if ep > 1:
            if not moe.num_experts:
                raise ConfigError(f"parallel.ep={ep} needs a MoE model (moe.num_experts > 0)")
            if moe.num_experts % ep:
                raise ConfigError(f"parallel.ep ({ep}) must divide moe.num_experts ({moe.num_experts}); valid ep: "
                                  f"{[d for d in range(1, moe.num_experts + 1) if moe.num_experts % d == 0]}")
            if (self.dp_shard * tp) % ep:
                raise ConfigError(
                    f"parallel.ep ({ep}) must divide parallel.dp_shard x parallel.tp = {self.dp_shard} x {tp} = "
                    f"{self.dp_shard * tp}: expert-parallel groups are drawn from those ranks")
        cfg.validate(dp=self.dp, tp=tp)

    # ------------------------------------------------------------------ sizes
    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Expert-data-parallel ranks inside one replica: (dp_shard x tp) / ep."""
        return self.dp_shard * self.tp // self.ep

    def coords(self, rank: int) -> dict[str, int]:
        r_tp = rank % self.tp
        r_shard = (rank // self.tp) % self.dp_shard
        r_rep = rank // (self.tp * self.dp_shard)
        inner = rank % (self.dp_shard * self.tp)
        return {"dp_replicate": r_rep, "dp_shard": r_shard, "tp": r_tp, "dp": r_rep * self.dp_shard + r_shard,
                "ep": inner % self.ep, "edp": inner // self.ep}

    # ------------------------------------------------------------------ meshes
    def build_meshes(self) -> None:
        """Create the device meshes (collective on every rank). No-op for one process."""
        if self.world == 1:
            return
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        ranks = torch.arange(self.world)
        self.meshes["dense"] = DeviceMesh(self.device_type, ranks.view(self.dp_replicate, self.dp_shard, self.tp),
                                          mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        self.meshes["expert"] = DeviceMesh(self.device_type, ranks.view(self.dp_replicate, self.edp, self.ep),
                                           mesh_dim_names=("dp_replicate", "edp", "ep"))

    def mesh(self, kind: str, *dims: str):
        return self.meshes[kind][dims if len(dims) > 1 else dims[0]]

    def group(self, kind: str, dim: str):
        return self.meshes[kind].get_group(dim)

    def dp_mesh(self):
        """Mesh over which dense weights are ZeRO-3 sharded (HSDP when dp_replicate > 1)."""
        if self.dp_replicate > 1:
            return self.mesh("dense", "dp_replicate", "dp_shard")
        return self.mesh("dense", "dp_shard")

    def edp_mesh(self):
        """Mesh over which expert weights are ZeRO-3 sharded."""
        if self.dp_replicate > 1:
            return self.mesh("expert", "dp_replicate", "edp")
        return self.mesh("expert", "edp")

    def describe(self) -> str:
        return (f"world {self.world} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp}; "
                f"ep {self.ep} (expert-data-parallel {self.dp_replicate * self.edp})")
