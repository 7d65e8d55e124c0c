"""The planner behind `ecdit plan` and `ecdit train --dry-run`: per-rank memory, step FLOPs,
communication and an estimated step time of a model on a cluster, for one layout or for every
valid layout (`search`). See docs/PLANNING.md for the model and its assumptions."""

from __future__ import annotations

import copy
from typing import Any

from ecdit_dist.config import Config, ConfigError, config_from_dict, load_config
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.planning.estimate import GIB, Cluster, plan_layout, precision_of
from ecdit_dist.planning.shards import ParamInfo, inventory

__all__ = ["Cluster", "build_config", "make_plan", "search", "format_plan", "format_search", "dry_run"]

PAPER_GLOBAL_BATCH = 4096     # the paper's batch; a --preset plan uses it unless told otherwise


def build_config(preset: str | None = None, config: str | None = None, overrides: list[str] | tuple = (),
                 *, tp: int | None = None, ep: int | None = None, dp_shard: int | None = None,
                 dp_replicate: int | None = None, micro_batch: int | None = None,
                 global_batch: int | None = None, checkpointing: bool | None = None,
                 optimizer: str | None = None, precision: str | None = None) -> Config:
    """The run config of a plan: a preset (the paper's batch of 4096, bf16) or a YAML file, with
    the layout and training options given on the command line applied on top."""
    if (preset is None) == (config is None):
        raise ConfigError("give exactly one of --preset NAME or --config FILE")
    if config is not None:
        cfg = load_config(config, list(overrides))
    else:
        from ecdit_dist.presets import PRESETS

        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; valid presets: {', '.join(PRESETS)}")
        from ecdit_dist.config import _apply_override

        raw: dict[str, Any] = {"model": {"preset": preset}}
        if not preset.startswith("tiny"):
            raw["train"] = {"global_batch_size": PAPER_GLOBAL_BATCH, "precision": "bf16"}
        for item in overrides:
            _apply_override(raw, item)
        cfg = config_from_dict(raw, validate=False)
    p, t = cfg.parallel, cfg.train
    for name, value in (("tp", tp), ("ep", ep), ("dp_shard", dp_shard), ("dp_replicate", dp_replicate)):
        if value is not None:
            if value < 1 and not (name == "dp_shard" and value == -1):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(p, name, value)
    if global_batch is not None:
        if global_batch < 1:
            raise ConfigError(f"--global-batch-size must be >= 1, got {global_batch}")
        t.global_batch_size = global_batch
    if micro_batch is not None:
        if micro_batch < 1:
            raise ConfigError(f"--micro-batch must be >= 1, got {micro_batch}")
        t.micro_batch_size = micro_batch
    if checkpointing is not None:
        t.activation_checkpointing = checkpointing
    if optimizer is not None:
        cfg.optim.name = optimizer
    if precision is not None:
        t.precision = precision
    return cfg


def _check_cluster(cluster: Cluster) -> None:
    for name, v in (("--nodes", cluster.nodes), ("--gpus-per-node", cluster.gpus_per_node)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}: a plan needs at least one GPU")
    if cluster.gpu_mem_gb <= 0:
        raise ConfigError(f"--gpu-mem-gb must be > 0, got {cluster.gpu_mem_gb}")
    for name, v in (("--peak-tflops", cluster.peak_tflops or 1), ("--intra-node-gbps", cluster.intra_node_gbps),
                    ("--inter-node-gbps", cluster.inter_node_gbps), ("matmul efficiency", cluster.matmul_efficiency)):
        if v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v}")
    if not 0 <= cluster.reserve_frac < 1:
        raise ConfigError(f"the memory reserve must be in [0, 1), got {cluster.reserve_frac}")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (tiny models)."""
    return f"{n / GIB:10.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:10.2f} MiB"


def _advice(cfg: Config, dims: ParallelDims, cluster: Cluster, params: list[ParamInfo], plan: dict) -> str:
    """For a plan that does not fit: by how much, and the nearest change that fits (if any)."""
    pr = plan["per_rank"]
    usable = pr["capacity_bytes"] - pr["reserve_bytes"]
    over = pr["total_bytes"] - usable
    state = pr["params_bytes"] + pr["grads_bytes"] + pr["optimizer_bytes"] + pr["ema_bytes"]
    msg = (f"needs {_gib(pr['total_bytes'])} per rank but {_gib(usable)} are usable "
           f"({_gib(pr['capacity_bytes'])} less a {cluster.reserve_frac:.0%} reserve): {_gib(over)} over. ")
    if state > usable:
        return msg + (f"Weights, gradients, optimizer state and EMA alone take {_gib(state)}: shard them over "
                      f"more ranks (larger dp_shard or ep, or more GPUs); try --search.")
    per_rank = cfg.train.global_batch_size // dims.dp
    for ac in sorted({cfg.train.activation_checkpointing, True}):
        for micro in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
            trial = copy.deepcopy(cfg)
            trial.train.activation_checkpointing, trial.train.micro_batch_size = ac, micro
            try:
                trial.validate(dp=dims.dp, tp=dims.tp)
            except ConfigError:
                continue
            other = plan_layout(trial, dims, cluster, params)
            if other["fits"]:
                return msg + (f"It fits with --micro-batch {micro}"
                              + (" --activation-checkpointing on" if ac and not cfg.train.activation_checkpointing else "")
                              + f" ({_gib(other['per_rank']['total_bytes'])}, est. step {other['step']['time_s']:.2f} s).")
    return msg + "No micro-batch fits this layout even with activation checkpointing; try --search."


def make_plan(cfg: Config, cluster: Cluster, params: list[ParamInfo] | None = None) -> dict:
    """The plan of the layout in `cfg.parallel` on `cluster`; an invalid layout raises ConfigError
    with the layout checks' own message."""
    _check_cluster(cluster)
    dims = ParallelDims.from_config(cfg, cluster.world)
    params = params if params is not None else inventory(cfg)
    plan = plan_layout(cfg, dims, cluster, params)
    plan["model"] = cfg.model.preset or "config"
    plan["cluster"] = {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpu_mem_gb": cluster.gpu_mem_gb}
    plan["assumptions"] = assumptions(cfg, cluster)
    if not plan["fits"]:
        plan["advice"] = _advice(cfg, dims, cluster, params, plan)
    return plan


def assumptions(cfg: Config, cluster: Cluster) -> dict:
    return {"peak_tflops": cluster.peak(precision_of(cfg)) / 1e12, "matmul_efficiency": cluster.matmul_efficiency,
            "intra_node_gbps": cluster.intra_node_gbps, "inter_node_gbps": cluster.inter_node_gbps,
            "reserve_frac": cluster.reserve_frac,
            "overlap": "FSDP all-gather/reduce-scatter and HSDP all-reduce overlap compute (only the excess counts); "
                       "all-to-all and tensor-parallel collectives do not overlap",
            "memory_unit": "GiB (2^30 bytes)"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: Config, cluster: Cluster) -> list[dict]:
    """Every valid layout of the cluster (tp inside a node, any ep, dp_replicate, with the best
    micro-batch and checkpointing choice for each), fitting ones first by estimated step time,
    then the ones that do not fit by how far over they are. Each has a "reason"."""
    _check_cluster(cluster)
    world, G = cluster.world, cluster.gpus_per_node
    params = inventory(cfg)
    experts = cfg.moe.num_experts
    results, invalid = [], 0
    for tp in _divisors(G):
        for rep in _divisors(world // tp) if world % tp == 0 else []:
            for ep in _divisors(experts) if experts else [1]:
                trial = copy.deepcopy(cfg)
                trial.parallel.tp, trial.parallel.ep, trial.parallel.dp_replicate = tp, ep, rep
                trial.parallel.dp_shard = world // (tp * rep)
                trial.train.micro_batch_size = None
                try:
                    dims = ParallelDims.from_config(trial, world)
                except ConfigError:
                    invalid += 1
                    continue
                best = None
                per_rank = trial.train.global_batch_size // dims.dp
                for ac in (False, True):
                    for micro in _divisors(per_rank):
                        trial.train.activation_checkpointing, trial.train.micro_batch_size = ac, micro
                        try:
                            trial.validate(dp=dims.dp, tp=tp)
                        except ConfigError:
                            continue
                        p = plan_layout(trial, dims, cluster, params)
                        key = (not p["fits"], p["step"]["time_s"] if p["fits"] else p["per_rank"]["total_bytes"])
                        if best is None or key < best[0]:
                            best = (key, p)
                if best is not None:
                    results.append(best[1])
    if not results:
        raise ConfigError(f"no valid layout for {world} ranks ({invalid} rejected by the layout checks)")
    results.sort(key=lambda p: (not p["fits"], p["step"]["time_s"] if p["fits"] else p["per_rank"]["total_bytes"]))
    top = results[0]
    for i, p in enumerate(results):
        p["model"] = cfg.model.preset or "config"
        p["rank"] = i + 1
        s = p["step"]
        usable = p["per_rank"]["capacity_bytes"] - p["per_rank"]["reserve_bytes"]
        if not p["fits"]:
            p["reason"] = (f"does not fit: needs {_gib(p['per_rank']['total_bytes'])} of {_gib(usable)} usable "
                           f"even at micro-batch {p['layout']['micro_batch_size']}"
                           f"{' with' if p['layout']['activation_checkpointing'] else ' without'} checkpointing")
        elif p is top:
            p["reason"] = (f"fastest fitting layout: {s['time_s']:.3f} s per step = compute {s['compute_s']:.3f} + "
                           f"all-to-all {s['a2a_s']:.3f} + tp {s['tp_s']:.3f} + exposed FSDP {s['fsdp_exposed_s']:.3f}; "
                           f"{_gib(p['per_rank']['total_bytes'])} of {_gib(usable)}")
        else:
            parts = {k: s[k] - top["step"][k] for k in ("compute_s", "a2a_s", "tp_s", "fsdp_exposed_s")}
            worst = max(parts, key=parts.get)
            names = {"compute_s": "more compute (tp copies, recompute or small micro-batches)",
                     "a2a_s": "slower all-to-all", "tp_s": "tensor-parallel collectives",
                     "fsdp_exposed_s": "FSDP traffic that compute cannot hide"}
            p["reason"] = (f"{s['time_s'] / top['step']['time_s'] - 1:+.1%} vs the best, mostly {names[worst]} "
                           f"(+{parts[worst]:.3f} s)")
    return results


# --------------------------------------------------------------------------- text output
def _layout_str(lay: dict) -> str:
    return (f"dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x tp {lay['tp']}, ep {lay['ep']} "
            f"(edp {lay['edp']}); micro-batch {lay['micro_batch_size']} x {lay['grad_accumulation']}; "
            f"checkpointing {'on' if lay['activation_checkpointing'] else 'off'}")


def format_plan(plan: dict) -> str:
    pr, s, a = plan["per_rank"], plan["step"], plan["assumptions"]
    lay = plan["layout"]
    rows = [f"plan: {plan['model']} on {plan['world']} ranks ({plan['cluster']['nodes']} node(s) x "
            f"{plan['cluster']['gpus_per_node']} GPUs, {plan['cluster']['gpu_mem_gb']:g} GiB each)",
            f"layout: {_layout_str(lay)}; {lay['precision']}, {lay['optimizer']}, global batch {lay['global_batch_size']}",
            "", "memory per rank"]
    for key, label in (("params_bytes", "parameters (fp32 shards)"), ("grads_bytes", "gradients (fp32 shards)"),
                       ("optimizer_bytes", f"optimizer state ({lay['optimizer']})"), ("ema_bytes", "EMA weights"),
                       ("gathered_bytes", "FSDP gathered units"), ("activations_bytes", "activations (one micro-batch)"),
                       ("backward_peak_extra_bytes", "backward peak extra"), ("a2a_buffer_bytes", "all-to-all buffers"),
                       ("total_bytes", "total"), ("reserve_bytes", f"reserve ({a['reserve_frac']:.0%})"),
                       ("capacity_bytes", "capacity")):
        rows.append(f"  {label:32s} {_size(pr[key])}")
    rows.append(f"  {'fits' if plan['fits'] else 'DOES NOT FIT'}: headroom {_size(plan['headroom_bytes']).strip()}")
    if "advice" in plan:
        rows.append(f"  {plan['advice']}")
    rows += ["", "step",
             f"  FLOPs (all ranks, incl. recompute) {s['flops']:.3e}; model FLOPs {s['model_flops']:.3e}; "
             f"per rank {s['flops_per_rank']:.3e}",
             f"  all-to-all {s['a2a_bytes_per_rank'] / 2**20:.1f} MiB/rank; tp {s['tp_bytes_per_rank'] / 2**20:.1f} MiB/rank;"
             f" FSDP all-gather {s['fsdp_allgather_bytes_per_rank'] / 2**20:.1f} MiB, reduce-scatter "
             f"{s['fsdp_reduce_scatter_bytes_per_rank'] / 2**20:.1f} MiB, HSDP all-reduce "
             f"{s['hsdp_allreduce_bytes_per_rank'] / 2**20:.1f} MiB per rank",
             f"  time {s['time_s']:.3f} s = compute {s['compute_s']:.3f} + all-to-all {s['a2a_s']:.3f} + tp "
             f"{s['tp_s']:.3f} + exposed FSDP {s['fsdp_exposed_s']:.3f} (FSDP total {s['fsdp_s']:.3f})",
             f"  MFU {s['mfu']:.1%}; {s['images_per_s']:.0f} images/s",
             f"  assumed: peak {a['peak_tflops']:.1f} TFLOP/s at {a['matmul_efficiency']:.0%} efficiency, links "
             f"{a['intra_node_gbps']:g} / {a['inter_node_gbps']:g} Gbit/s intra / inter node; {a['overlap']}"]
    return "\n".join(rows)


def format_search(plans: list[dict], top: int = 10) -> str:
    fitting = [p for p in plans if p["fits"]]
    rows = [f"{len(fitting)} of {len(plans)} valid layouts fit; best first:",
            f"{'#':>3s} {'rep':>4s} {'shard':>5s} {'tp':>3s} {'ep':>3s} {'micro':>5s} {'ac':>3s} {'GiB':>6s} "
            f"{'step s':>7s} {'MFU':>6s}  reason"]
    for p in plans[:top]:
        lay = p["layout"]
        rows.append(f"{p['rank']:3d} {lay['dp_replicate']:4d} {lay['dp_shard']:5d} {lay['tp']:3d} {lay['ep']:3d} "
                    f"{lay['micro_batch_size']:5d} {'on' if lay['activation_checkpointing'] else 'off':>3s} "
                    f"{p['per_rank']['total_bytes'] / GIB:6.1f} {p['step']['time_s']:7.3f} {p['step']['mfu']:6.1%}  "
                    f"{p['reason']}")
    if len(plans) > top:
        rows.append(f"... {len(plans) - top} more (--top N or --json for all)")
    return "\n".join(rows)


# --------------------------------------------------------------------------- train --dry-run
def dry_run(cfg: Config, world: int, cluster: Cluster | None = None) -> str:
    """Build the configured model on the meta device under the layout's real shard shapes (fake
    process group, rank 0), check them against the plan, and return the plan as text. Without a
    cluster: `world` ranks, 8 per node, each with this machine's GPU memory (80 GiB without one)."""
    from ecdit_dist.planning.shards import local_shape, measure_shards

    note = ""
    if cluster is None:
        import torch

        if torch.cuda.is_available():
            mem = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
            note = f"memory per rank: this machine's GPU ({mem} GiB)"
        else:
            mem = 80.0
            note = "memory per rank: 80 GiB assumed (no GPU here; `ecdit plan --config FILE` plans other clusters)"
        G = 8 if world % 8 == 0 else world
        cluster = Cluster(nodes=world // G, gpus_per_node=G, gpu_mem_gb=mem)
    if cluster.world != world:
        raise ConfigError(f"the cluster has {cluster.world} ranks but the run {world}")
    plan = make_plan(cfg, cluster)
    dims = ParallelDims.from_config(cfg, world)
    built = measure_shards(cfg, world, 0)
    expected = {p.name: local_shape(p, dims, 0) for p in inventory(cfg)}
    wrong = [n for n in expected if tuple(built.get(n, ())) != expected[n]]
    check = (f"built the model on the meta device as rank 0 of {world}: {len(built)} parameter shards, "
             + ("every shape as planned" if not wrong else f"{len(wrong)} differ from the plan, e.g. {wrong[:3]}"))
    return "\n".join(x for x in (format_plan(plan), "", check, note) if x is not None)
