"""Code run inside spawned ranks by the device-readiness tests (CPU twins) and the GPU test set.

Every function here runs unchanged on CPU + gloo and on CUDA + NCCL: the Trainer picks the
device and the backend.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from workers import EQUIV, QUIET, TINY, _full

# ------------------------------------------------------------------ collective audit
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
               "all_to_all_single", "broadcast", "reduce_scatter", "all_to_all", "gather", "scatter")


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


@contextlib.contextmanager
def audit_collectives(device_type: str, calls: list[tuple[str, tuple[str, ...]]]):
    """Record every torch.distributed collective called while active as (name, device types of
    its tensors) in `calls`, and raise at the call when a tensor is not on `device_type`."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def audited(*args, **kwargs):
            types = tuple(t.device.type for t in _tensors(args, kwargs))
            calls.append((name, types))
            wrong = [t for t in types if t != device_type]
            if wrong:
                raise RuntimeError(f"collective {name} got tensors on {wrong} while the training device is "
                                   f"{device_type}: an NCCL-only group would fail here")
            return fn(*args, **kwargs)
        return audited

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def audited_run(rank: int, world: int, run_dir: str) -> list[tuple[str, tuple[str, ...]]]:
    """Train 2 steps with a checkpoint, then resume from it in a second trainer (the all-ranks
    validity vote runs), every collective audited against the training device."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    calls: list = []
    over = [f"run.dir={run_dir}", "train.steps=2", *QUIET, "checkpoint.interval=1", "parallel.ep=2"]
    first = Trainer(load_config(TINY, over))
    with audit_collectives(first.device.type, calls):
        first.fit()
        second = Trainer(load_config(TINY, [*over, "train.steps=3"]))
        second.fit()
    second.close()
    return calls


# ------------------------------------------------------------------ bf16 mixed precision
def bf16_run(rank: int, world: int, overrides: list[str], run_dir: str, steps: int) -> dict[str, Any] | None:
    """bf16 training on this layout; records the dtype of t at the timestep embedder, the router's
    weight / input / logits dtypes, and every expert choice of the first forward."""
    import ecdit_dist.model.moe as moe_module
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    cfg = load_config(TINY, [*EQUIV, *overrides, "train.precision=bf16", f"run.dir={run_dir}", *QUIET])
    trainer = Trainer(cfg)
    rec: dict[str, Any] = {"t_dtype": [], "router": [], "choices": []}
    model = trainer.model
    # The dense FFNs' row-parallel output projections add bf16 partial products over tp ranks, which
    # one process rounds once: bf16 tensor parallelism changes the residual stream by a rounding
    # (as in Megatron). Their weights start at zero here, so the first forward's router inputs are
    # equal by construction and the comparison isolates the routing precision itself.
    with torch.no_grad():
        for block in model.blocks:
            if not block.is_moe:
                block.ffn.w2.weight.zero_()
    model.t_embed.register_forward_pre_hook(lambda m, args: rec["t_dtype"].append(str(args[0].dtype)))
    for layer in model.moe_layers():
        layer.router.register_forward_hook(
            lambda m, args, out: rec["router"].append((str(m.weight.dtype), str(args[0].dtype), str(out.dtype))))
    real = moe_module.expert_choice

    def recording(logits, capacity):
        choice = real(logits, capacity)
        if len(rec["choices"]) < len(model.moe_layers()):          # the first forward only
            rec["choices"].append(choice.index.sort(dim=-1).values.cpu())   # (G, E, C)
        return choice

    moe_module.expert_choice = recording
    try:
        losses = [float(trainer.train_step(s)["loss"]) for s in range(steps)]
    finally:
        moe_module.expert_choice = real
    # gather the choices of every rank in global token order: data-parallel rank, then tp rank
    coords = trainer.dims.coords(trainer.rank)
    choices = rec["choices"]
    if trainer.dims.world > 1:
        gathered: list = [None] * trainer.dims.world
        dist.all_gather_object(gathered, (coords["dp"], coords["tp"], choices))
        order = sorted(gathered, key=lambda x: (x[0], x[1]))
        choices = [torch.cat([o[2][i] for o in order]) for i in range(len(choices))]
    out = {"losses": losses, "t_dtype": sorted(set(rec["t_dtype"])), "router": sorted(set(rec["router"])),
           "choices": choices,
           "router_param": sorted({str(_full(layer.router.weight).dtype) for layer in model.moe_layers()})}
    trainer.close()
    return out if rank == 0 else None


# ------------------------------------------------------------------ initialisation
def init_weights(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, Any] | None:
    """Full weights (on rank 0) after `train.init=meta` and after `train.init=full` on this layout."""
    from ecdit_dist.config import load_config
    from ecdit_dist.parallel.ac import clean_fqn
    from ecdit_dist.train import Trainer

    out = {}
    trainers = []
    for init in ("meta", "full"):
        t = Trainer(load_config(TINY, [*overrides, f"train.init={init}", f"run.dir={run_dir}", *QUIET]))
        out[init] = {clean_fqn(n): _full(p) for n, p in t.model.named_parameters()}
        out[init]["pos_embed"] = t.model.pos_embed.detach().cpu().clone()
        t.data.close()
        trainers.append(t)
    trainers[-1].close()
    return out if rank == 0 else None


# ------------------------------------------------------------------ plain training (GPU test set)
def train_losses(rank: int, world: int, overrides: list[str], run_dir: str, steps: int) -> list[float] | None:
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    trainer = Trainer(load_config(TINY, [*EQUIV, *overrides, f"run.dir={run_dir}", *QUIET]))
    losses = [float(trainer.train_step(s)["loss"]) for s in range(steps)]
    trainer.close()
    return losses if rank == 0 else None


def sync_count(rank: int, world: int, overrides: list[str], run_dir: str) -> int:
    """Host-device synchronisations in one expert-choice training step (after a warm-up step),
    counted by CUDA's sync debug mode."""
    import warnings

    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    trainer = Trainer(load_config(TINY, [*overrides, f"run.dir={run_dir}", *QUIET]))
    trainer.train_step(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    trainer.close()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs)


def on_cpu(rank: int, world: int, fn_name: str, *args):
    """Run gpu_workers.<fn_name> in this process with no GPU visible (the CPU reference)."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return globals()[fn_name](rank, world, *args)


def moe_layer_cuda(rank: int, world: int, seed: int, router: str) -> dict[str, Any]:
    """One expert-parallel MoE layer (ep = world) on cuda:rank over NCCL, against the same layer
    run for every rank's tokens in this process on the same GPU."""
    import copy

    from torch.distributed.device_mesh import DeviceMesh

    from ecdit_dist.model.moe import ExpertChoiceMoE, TokenChoiceMoE
    from ecdit_dist.parallel.ep import apply_expert_parallel

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=dev)
    try:
        torch.manual_seed(seed)
        d, E, g = 16, 8, 16
        if router == "expert_choice":
            layer = ExpertChoiceMoE(d, 32, E, 2.0, g)
        else:
            layer = TokenChoiceMoE(d, 32, E, top_k=2, token_capacity_factor=None, group_size=g)
        with torch.no_grad():
            layer.router.weight.normal_()
        layer = layer.to(dev)
        ref = copy.deepcopy(layer)
        x_all, probe = torch.randn(world, 4, g, d).to(dev), torch.randn(world, 4, g, d).to(dev)
        x_ref = x_all.clone().requires_grad_(True)
        ref_out = torch.stack([ref(x_ref[r]) for r in range(world)])
        (ref_out * probe).sum().backward()
        holder = torch.nn.Module()
        holder.moe_layers = lambda: [layer]
        apply_expert_parallel(holder, DeviceMesh("cuda", torch.arange(world), mesh_dim_names=("ep",)))
        x = x_all[rank].clone().requires_grad_(True)
        out = layer(x)
        (out * probe[rank]).sum().backward()
        e_local = E // world
        return {"out": out.detach().cpu(), "ref_out": ref_out[rank].detach().cpu(), "dx": x.grad.cpu(),
                "ref_dx": x_ref.grad[rank].cpu(), "w1_grad": layer.experts.w1.grad.to_local().cpu(),
                "ref_w1_grad": ref.experts.w1.grad[rank * e_local:(rank + 1) * e_local].cpu()}
    finally:
        dist.destroy_process_group()


def sample_at_end(rank: int, world: int, overrides: list[str], run_dir: str) -> None:
    """Train 2 steps and write the end-of-run sample grid (2 Euler steps, one image per prompt)."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    over = [*QUIET, "sample.at_end=true", "sample.steps=2", "sample.per_prompt=1", "train.steps=2", *overrides,
            f"run.dir={run_dir}"]
    Trainer(load_config(TINY, over)).run()


# ------------------------------------------------------------------ host reads per step (CPU twin)
def host_reads(rank: int, world: int, overrides: list[str], run_dir: str, steps: int) -> list[list[str]]:
    """fit() for `steps` steps (the last one logs, with routing statistics): the operations that
    would make the host wait for the device (tests/host_sync.py), counted inside each training step."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer
    from host_sync import count_host_syncs

    per_step: list[list[str]] = []

    class Counted(Trainer):
        def train_step(self, step, log=False):
            with count_host_syncs() as syncs:
                out = super().train_step(step, log=log)
            per_step.append(syncs.ops)
            return out

    over = [*QUIET, "train.global_batch_size=8", f"train.steps={steps}", f"logging.interval={steps}",
            "optim.grad_clip=1.0", *overrides, f"run.dir={run_dir}"]
    trainer = Counted(load_config(TINY, over))
    trainer.run()
    assert trainer.step == steps
    return per_step


# ------------------------------------------------------------------ sampling through the sharded model
def sharded_samples(rank: int, world: int, overrides: list[str], run_dir: str) -> dict[str, Any] | None:
    """Guided and unguided latents of 3 prompts (an odd batch: the sampler pads it) from the
    sharded model of this layout, every rank taking part, and the trainer's end-of-run grid; on
    rank 0 also the same from a one-process model holding the same weights."""
    from pathlib import Path

    from ecdit_dist.config import load_config
    from ecdit_dist.model import ECDiT
    from ecdit_dist.parallel.ac import clean_fqn
    from ecdit_dist.sample import generate, sample_grid
    from ecdit_dist.train import Trainer
    from workers import wake_zero_init

    cfg = load_config(TINY, [*QUIET, "sample.steps=2", "sample.per_prompt=1", "sample.use_ema=false", *overrides,
                             f"run.dir={run_dir}"])
    trainer = Trainer(cfg)
    wake_zero_init(trainer.model)            # non-trivial outputs: zero-initialised layers get values
    g = torch.Generator().manual_seed(11)
    text = torch.randn(3, cfg.model.text_len, cfg.model.text_dim, generator=g)
    mask = torch.ones(3, cfg.model.text_len, dtype=torch.bool)
    mask[1, 3:] = False
    out: dict[str, Any] = {}
    for scale in (1.0, 4.0):
        out[f"sharded/{scale}"] = generate(trainer.model, text, mask, 2, scale, 7, token_split=trainer.dims.tp)
    grid = Path(run_dir) / "sharded.png"
    trainer.sample_grid(grid)
    full = {clean_fqn(n): _full(p) for n, p in trainer.model.named_parameters()}
    if rank == 0:
        one = ECDiT(cfg.model, cfg.moe)
        one.load_state_dict(full)
        for scale in (1.0, 4.0):
            out[f"one/{scale}"] = generate(one, text, mask, 2, scale, 7)
        encoder = trainer.data.text_encoder
        if encoder is None:
            from ecdit_dist.data.text import build_text_encoder

            encoder = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.model.text_len, trainer.device)
        sample_grid(one, encoder, trainer.data.decode, cfg.sample.prompts, 1, 2, cfg.sample.cfg_scale, cfg.seed,
                    Path(run_dir) / "one.png")
        out["grids"] = (str(grid), str(Path(run_dir) / "one.png"))
    trainer.close()
    return out if rank == 0 else None
