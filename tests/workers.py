"""Code that runs inside spawned ranks (importable by the child processes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "sample.at_end=false", "checkpoint.interval=0"]
# big enough steps that 5 optimizer updates move every weight far more than the tolerance
EQUIV = ["optim.name=rmsprop", "optim.warmup_steps=0", "optim.lr=3e-4", "optim.ema_decay=0"]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().cpu()


def _gather_dp(trainer, t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-data-parallel-rank tensor in data order (tp ranks hold copies)."""
    dims = trainer.dims
    if dims.world == 1:
        return t.detach().cpu()
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dims.world)]
    dist.all_gather(parts, t.detach().contiguous())
    by_dp = {dims.coords(r)["dp"]: parts[r] for r in range(dims.world) if dims.coords(r)["tp"] == 0}
    return torch.cat([by_dp[i] for i in range(dims.dp)]).cpu()


@torch.no_grad()
def wake_zero_init(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give zero-initialised weights (adaLN, output layers, biases) the same small random values on
    every layout, so the very first gradients already flow through every path of the network."""
    from ecdit_dist.diffusion import sample_key
    from ecdit_dist.parallel.ac import clean_fqn

    for name, p in model.named_parameters():
        name = clean_fqn(name)
        g = torch.Generator().manual_seed(sample_key(len(name), *name.encode()))
        noise = torch.randn(p.shape, generator=g) * std         # p.shape is the global shape
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            if p.full_tensor().abs().max() == 0:
                p.copy_(distribute_tensor(noise, p.device_mesh, p.placements))
        elif p.abs().max() == 0:
            p.copy_(noise)


def collect(trainer, steps: int) -> dict[str, Any]:
    """Forward output, gradients of every parameter and `steps` optimizer steps, all gathered."""
    from ecdit_dist.diffusion import interpolate
    from ecdit_dist.parallel.ac import clean_fqn

    out: dict[str, Any] = {"layout": trainer.dims.describe()}
    model = trainer.model
    wake_zero_init(model)
    latents, text, mask, draws = trainer.batch(0)
    with torch.no_grad():
        pred = model(interpolate(latents, draws.noise, draws.t), draws.t, text, mask, keep=draws.keep,
                     drop_text=draws.drop_text)
    out["pred"] = _gather_dp(trainer, pred)
    loss_sum, _ = trainer.backward_step(0)
    out["loss0"] = float(trainer.dp_sum(loss_sum) / trainer.cfg.train.global_batch_size)
    out["grads"] = {clean_fqn(n): _full(p.grad) for n, p in model.named_parameters()}
    out["shards"] = {clean_fqn(n): (p.to_local() if hasattr(p, "to_local") else p).numel()
                     for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out["init"] = {clean_fqn(n): _full(p) for n, p in model.named_parameters()}
    tp_group = trainer.dims.group("dense", "tp") if trainer.dims.tp > 1 else None
    with ExchangeAudit(tp_group) as audit:                  # the collectives of one full step
        out["losses"] = [float(trainer.train_step(0)["loss"])]
    out["exchanges"] = dict(audit.calls)
    cfg = trainer.cfg.train
    out["micro_batches"] = cfg.global_batch_size // trainer.dims.dp // (cfg.micro_batch_size or
                                                                       cfg.global_batch_size // trainer.dims.dp)
    out["losses"] += [float(trainer.train_step(s)["loss"]) for s in range(1, steps)]
    out["params"] = {clean_fqn(n): _full(p) for n, p in model.named_parameters()}
    return out


class ExchangeAudit:
    """Counts, while active, the calls of all_to_all_single (expert parallelism: FSDP does not use
    it) and the all-gathers on the tensor-parallel group (the MoE token gather; FSDP gathers on
    its own groups)."""

    def __init__(self, tp_group=None) -> None:
        self.tp_group = tp_group
        self.calls = {"all_to_all": 0, "tp_gather": 0}

    def __enter__(self):
        import torch.distributed as dist

        self.real = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather_single",
                                                            "all_gather_into_tensor") if hasattr(dist, name)}

        def a2a(*args, **kwargs):
            self.calls["all_to_all"] += 1
            return self.real["all_to_all_single"](*args, **kwargs)

        def gather(name):
            def call(*args, **kwargs):
                group = kwargs.get("group", args[2] if len(args) > 2 else None)
                if self.tp_group is not None and group is self.tp_group:
                    self.calls["tp_gather"] += 1
                return self.real[name](*args, **kwargs)
            return call

        dist.all_to_all_single = a2a
        for name in self.real:
            if name != "all_to_all_single":
                setattr(dist, name, gather(name))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self.real.items():
            setattr(dist, name, fn)
        return False


def equivalence(rank: int, world: int, layouts: dict[str, list[str]], run_dir: str,
                steps: int) -> dict[str, dict[str, Any]]:
    """`collect` for every layout (name -> overrides) of this world, one after the other in one
    process group (a spawn and a process group per layout would cost more than the runs)."""
    import torch.distributed as dist

    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    results = {}
    try:
        for name, overrides in layouts.items():
            trainer = Trainer(load_config(TINY, [*EQUIV, *overrides, f"run.dir={run_dir}/{name}", *QUIET]))
            try:
                result = collect(trainer, steps)
            finally:
                trainer.preemption.uninstall()
                trainer.data.close()
            keep = ("shards", "exchanges", "micro_batches")
            results[name] = result if rank == 0 else {k: result[k] for k in keep}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


def moe_layers(rank: int, world: int, seed: int, cases: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """`moe_layer` for every (router, exchange, gemm) case, in one process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return [moe_layer(rank, world, seed, *case) for case in cases]
    finally:
        dist.destroy_process_group()


def moe_layer(rank: int, world: int, seed: int, router: str, exchange: str = "auto",
              gemm: str = "auto") -> dict[str, Any]:
    """One expert-parallel MoE layer (ep = world) against the same layer in one process, with the
    given all-to-all form and expert GEMM form (auto: chosen from timings summed over ranks);
    then the host syncs of one more forward and backward. Token choice has a capacity that
    drops assignments. Needs the default process group."""
    import copy

    from torch.distributed.device_mesh import DeviceMesh

    from ecdit_dist.model import expert_gemm
    from ecdit_dist.model.moe import ExpertChoiceMoE, TokenChoiceMoE
    from ecdit_dist.parallel.ep import apply_expert_parallel
    from ecdit_dist.parallel.gemm_agreement import agree_on_expert_gemm

    torch.manual_seed(seed)
    d, E, g = 16, 8, 16
    if router == "expert_choice":
        layer = ExpertChoiceMoE(d, 32, E, 2.0, g, expert_gemm=gemm)
    else:
        layer = TokenChoiceMoE(d, 32, E, top_k=2, token_capacity_factor=1.0, group_size=g)
    with torch.no_grad():
        layer.router.weight.normal_()
    ref = copy.deepcopy(layer)
    x_all, probe = torch.randn(world, 4, g, d), torch.randn(world, 4, g, d)   # each rank: 4 x 16 tokens
    x_ref = x_all.clone().requires_grad_(True)
    ref_out = torch.stack([ref(x_ref[r]) for r in range(world)])             # every rank's tokens, one process
    (ref_out * probe).sum().backward()

    holder = torch.nn.Module()
    holder.moe_layers = lambda: [layer]
    apply_expert_parallel(holder, DeviceMesh("cpu", torch.arange(world), mesh_dim_names=("ep",)), exchange)
    expert_gemm.clear_cache()
    agree_on_expert_gemm(holder)
    x = x_all[rank].clone().requires_grad_(True)
    out = layer(x)
    (out * probe[rank]).sum().backward()
    e_local = E // world
    result = {
        "out": out.detach(), "ref_out": ref_out[rank].detach(),
        "dx": x.grad.clone(), "ref_dx": x_ref.grad[rank],
        "w1_grad": layer.experts.w1.grad.to_local().clone(),
        "ref_w1_grad": ref.experts.w1.grad[rank * e_local:(rank + 1) * e_local],
        "w1_shape": tuple(layer.experts.w1.to_local().shape),
        "router_grad": layer.router.weight.grad.clone(), "ref_router_grad": ref.router.weight.grad,
        "plans": [plan for plan, _ in expert_gemm.chosen().values()],
    }
    from host_sync import count_host_syncs

    with count_host_syncs() as syncs:
        (layer(x) * probe[rank]).sum().backward()
    result["host_syncs"] = syncs.ops
    return result


def dead_peer(rank: int, world: int, run_dir: str) -> None:
    """Rank 1 dies after the first step; rank 0 must fail with an error, not hang."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    cfg = load_config(TINY, ["parallel.timeout_s=20", f"run.dir={run_dir}", "train.steps=5", *QUIET])
    trainer = Trainer(cfg)
    trainer.train_step(0)
    if rank == 1:
        os._exit(0)
    trainer.train_step(1)   # must raise


def train_layout(rank: int, world: int, run_dir: str, overrides: list[str], steps: int) -> None:
    """Train (or resume) to `steps` on this layout, as `ecdit train` would."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    Trainer(load_config(TINY, [*overrides, f"run.dir={run_dir}", f"train.steps={steps}", *QUIET])).run()


def crash_during_commit(rank: int, world: int, run_dir: str) -> None:
    """Die (like a killed process) while the second checkpoint is being committed."""
    import ecdit_dist.checkpoint.manager as manager
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    real = manager.write_manifest
    calls = []

    def dying(folder, *args):
        calls.append(folder)
        if len(calls) == 2:
            os._exit(3)
        return real(folder, *args)

    manager.write_manifest = dying
    cfg = load_config(TINY, [f"run.dir={run_dir}", "train.steps=3", *QUIET, "checkpoint.interval=1", "logging.interval=1"])
    Trainer(cfg).fit()


def cli_train(rank: int, world: int, argv: list[str]) -> tuple[int, str]:
    """`ecdit train` in this rank: (exit status, stderr)."""
    import contextlib
    import io

    from ecdit_dist.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def cli_train_each(rank: int, world: int, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """`cli_train` for each argv in turn (each expected to fail before training)."""
    return [cli_train(rank, world, argv) for argv in argvs]


def deepspeed_checkpoint(rank: int, world: int, ds_dir: str, stage: int) -> dict[str, Any]:
    """Train the tiny model 2 steps under DeepSpeed ZeRO (CPU, gloo), save a DeepSpeed checkpoint
    and return the engine's full weights."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce (an inference kernel, about a
    # minute of g++) when it starts; the checkpoint format under test does not depend on it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from ecdit_dist.config import load_config
    from ecdit_dist.model import ECDiT

    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = ECDiT(cfg.model, cfg.moe)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                "steps_per_print": 1000})
    for _ in range(2):
        x = torch.randn(2, 8, 16, 16)
        out = engine(x, torch.rand(2), torch.randn(2, 16, 64), torch.ones(2, 16, dtype=torch.bool))
        engine.backward(out.pow(2).mean())
        engine.step()
    engine.save_checkpoint(ds_dir, tag="step2")
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    else:
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return weights if rank == 0 else {}


def train_collect_ids(rank: int, world: int, run_dir: str, overrides: list[str], steps: int) -> list[tuple[int, list]]:
    """Train to `steps` (resuming if run_dir has a checkpoint); return (step, sample ids) this rank trained on."""
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    seen: list[tuple[int, list]] = []

    class Recording(Trainer):
        def batch(self, step):
            out = super().batch(step)
            seen.append((step, self.last_ids.tolist()))
            return out

    Recording(load_config(TINY, [*overrides, f"run.dir={run_dir}", f"train.steps={steps}", *QUIET])).run()
    return seen


def nonfinite_guard(rank: int, world: int, run_dir: str, layout: list[str], steps: int, bad: int) -> dict[str, Any]:
    """A NaN written into one gradient element of rank 1 at step `bad` (after the gradient
    reduction, as a faulty device would): with on_nonfinite=skip against a run that never
    applies step `bad`, then with on_nonfinite=stop."""
    from ecdit_dist.config import load_config
    from ecdit_dist.guard import NonFiniteError
    from ecdit_dist.metrics import read_metrics
    from ecdit_dist.parallel.ac import clean_fqn
    from ecdit_dist.train import Trainer

    poisoned: list[str] = []

    class Faulty(Trainer):
        def backward_step(self, step):
            out = super().backward_step(step)
            if step == bad and self.rank == 1:
                for name, p in self.model.named_parameters():
                    local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    if local.numel():
                        local.view(-1)[local.numel() // 2] = float("nan")
                        poisoned.append(clean_fqn(name))
                        break
            return out

    def config(name: str, *extra: str):
        return load_config(TINY, [*EQUIV, "optim.ema_decay=0.9", *layout, "train.global_batch_size=8",
                                  "logging.interval=1",
                                  f"run.dir={run_dir}/{name}", f"train.steps={steps}", *QUIET, *extra])

    guarded = Faulty(config("skip", "train.on_nonfinite=skip"))
    guarded.fit()
    ref = Trainer(config("ref"))
    ref_losses = {}
    for s in range(steps):
        if s != bad:                                   # this run never sees step `bad`'s update
            ref_losses[s + 1] = float(ref.train_step(s)["loss"])
    same_params = all(torch.equal(_full(a), _full(b)) for a, b in zip(guarded.model.parameters(),
                                                                       ref.model.parameters()))
    same_ema = all(torch.equal(_full(guarded.ema.shadow[k]), _full(ref.ema.shadow[k])) for k in ref.ema.shadow)
    stop_error = None
    try:
        Faulty(config("stop", "train.on_nonfinite=stop")).fit()
    except NonFiniteError as e:
        stop_error = str(e)
    records = read_metrics(f"{run_dir}/skip") if rank == 0 else []
    return {"records": records, "ref_losses": ref_losses, "same_params": same_params, "same_ema": same_ema,
            "stop_error": stop_error, "poisoned": poisoned}


def fill_disk(folder: str) -> None:
    """Write a file into `folder` until the filesystem really returns ENOSPC."""
    import errno

    with open(Path(folder) / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            try:
                while True:
                    f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def full_disk(rank: int, world: int, run_dir: str, phase: str) -> str | None:
    """Train on a small filesystem; rank 0 fills it before the second checkpoint is written
    (phase "save") or after its files are written, before the commit (phase "commit")."""
    import ecdit_dist.checkpoint.manager as manager
    from ecdit_dist.checkpoint.errors import CheckpointError
    from ecdit_dist.config import load_config
    from ecdit_dist.train import Trainer

    if phase == "commit" and rank == 0:
        real = manager.CheckpointManager._commit

        def commit(self, d, step, *args):
            if step == 2:
                fill_disk(run_dir)
            return real(self, d, step, *args)

        manager.CheckpointManager._commit = commit

    class Filling(Trainer):
        def save(self, async_save=False):
            if phase == "save" and self.step == 2 and self.rank == 0:
                fill_disk(run_dir)
            return super().save(async_save)

    cfg = load_config(TINY, [*QUIET, f"run.dir={run_dir}", "train.steps=3", "checkpoint.interval=1",
                             "train.global_batch_size=8", "parallel.timeout_s=600", "checkpoint.timeout_s=600"])
    try:
        Filling(cfg).run()
    except CheckpointError as e:
        return str(e)
    return None


def async_vs_sync(rank: int, world: int, run_dir: str, layout: list[str], steps: int) -> dict[str, Any]:
    """The same run saved synchronously and in the background: weights, EMA and losses."""
    from ecdit_dist.config import load_config
    from ecdit_dist.metrics import read_metrics
    from ecdit_dist.train import Trainer

    out: dict[str, Any] = {}
    for mode in ("sync", "async"):
        cfg = load_config(TINY, [*QUIET, *layout, f"run.dir={run_dir}/{mode}", f"train.steps={steps}",
                                 "checkpoint.interval=2", "checkpoint.keep_last=10", "train.global_batch_size=8",
                                 "logging.interval=1", f"checkpoint.async_save={mode == 'async'}"])
        t = Trainer(cfg)
        t.fit()
        out[mode] = {"params": [_full(p) for p in t.model.parameters()],
                     "ema": {k: _full(v) for k, v in t.ema.shadow.items()}}
        if rank == 0:
            out[mode]["losses"] = [r["loss"] for r in read_metrics(f"{run_dir}/{mode}")]
    return out


def free_closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def write_synthetic_model(folder, model: dict, moe: dict, seed: int) -> dict:
    """A consolidated safetensors model of random fp32 weights plus its config.json, written tensor
    by tensor into `folder`; returns the tensor infos."""
    import json

    from ecdit_dist.checkpoint.tensors import TensorInfo, expected_tensors, write_safetensors

    infos = {k: TensorInfo(tuple(v), torch.float32) for k, v in expected_tensors(model, moe).items()}
    gen = torch.Generator().manual_seed(seed)
    write_safetensors(folder, infos, lambda n: torch.randn(infos[n].shape, generator=gen), 0)
    (Path(folder) / "config.json").write_text(json.dumps({"model": model, "moe": moe}))
    return infos


# ------------------------------------------------------------------ several rank functions in one spawn
class FreshState:
    """What a rank function may change in its process and a freshly spawned rank starts from:
    random streams, torch's global switches, environment, signal routing, warnings filters, and
    the functions of torch.distributed, torch.Tensor and this package (a worker's monkeypatch).
    `capture` in a fresh rank; `restore` after a job (and before the next one)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def capture(self) -> "FreshState":
        import random
        import signal
        import warnings

        import numpy as np

        self.rng = (torch.get_rng_state(), torch.initial_seed(), random.getstate(), np.random.get_state())
        self.switches = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads(),
                         torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
                         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
        self.environ = dict(os.environ)
        self.signals = {name: signal.getsignal(getattr(signal, name)) for name in self.SIGNALS}
        self.warnings = list(warnings.filters)
        self.functions = self._functions()
        return self

    @staticmethod
    def _owners():
        """Modules and classes whose functions a worker may replace."""
        import sys

        names = [n for n in list(sys.modules) if n == "ecdit_dist" or n.startswith("ecdit_dist.")]
        owners: list = [torch.distributed, torch.distributed.distributed_c10d, torch.Tensor]
        for name in names:
            mod = sys.modules[name]
            if mod is None:
                continue
            owners.append(mod)
            owners += [v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == name]
        return owners

    def _functions(self) -> dict[tuple[int, str], tuple[Any, Any]]:
        import warnings

        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # looking at a deprecated object (dist.reduce_op) warns
            for owner in self._owners():
                for key, value in list(vars(owner).items()):
                    if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                        out[(id(owner), key)] = (owner, value)
        return out

    def restore(self) -> list[str]:
        """Undo what a job changed; returns the replaced functions it left behind (put back)."""
        import gc
        import random
        import signal
        import warnings

        import numpy as np

        from ecdit_dist.checkpoint import safe_load
        from ecdit_dist.data.pipeline import DataPipeline
        from ecdit_dist.model import expert_gemm
        from ecdit_dist.parallel import ac
        from ecdit_dist.preemption import Preemption

        dist = torch.distributed
        if dist.is_initialized():                      # a job that left its process group
            dist.destroy_process_group()
        gc.collect()
        for obj in gc.get_objects():                   # trainers a job dropped without close()
            if isinstance(obj, Preemption) and obj._installed:
                obj.uninstall()                        # signal routing and its wakeup fd
            elif isinstance(obj, DataPipeline):
                obj.close()                            # its prefetch threads
        signal.set_wakeup_fd(-1)
        for name, handler in self.signals.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
        patched = []
        for (_, key), (owner, value) in self.functions.items():
            if vars(owner).get(key) is not value:
                patched.append(f"{getattr(owner, '__name__', owner)}.{key}")
                setattr(owner, key, value)
        expert_gemm.clear_cache()                      # plans are chosen afresh, as in a new process
        safe_load._checked.clear()
        ac._state.stash = None
        warnings.filters[:] = self.warnings
        warnings._filters_mutated()
        os.environ.clear()
        os.environ.update(self.environ)
        dtype, grad, threads, deterministic, precision, tf32_matmul, tf32_cudnn = self.switches
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_matmul, tf32_cudnn
        for device, (enabled, cast) in self.autocast.items():
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, cast)
        torch.clear_autocast_cache()
        cpu, seed, py, npy = self.rng
        torch.set_rng_state(cpu)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.manual_seed_all(seed)               # a fresh process's CUDA streams start at this seed
            torch.cuda.empty_cache()
        random.setstate(py)
        np.random.set_state(npy)
        self.functions.update({k: v for k, v in self._functions().items() if k not in self.functions})
        return patched


def jobs(rank: int, world: int, todo: list[tuple[str, Any, tuple]], timeout: float = 1800) -> list[Any]:
    """Several rank functions one after the other in the same ranks (a spawn and its torch import
    on a 2-core runner cost more than most of the runs): job (name, fn, args) runs fn(rank, world,
    *args); returns their results in order.

    Each job starts as in a freshly spawned rank (FreshState): no default process group (a job
    that leaves one has it destroyed), its own MASTER_PORT (a new rendezvous: the previous
    store may still hold the old port), the fresh random streams, switches, environment and
    signal routing, no expert GEMM plans, and every function a job replaced put back. The ranks
    start a job together, after every rank finished the one before (files rank 0 wrote are
    there). A job that raises stops the spawn with an error that names it."""
    import importlib
    from datetime import timedelta

    import torch.distributed as dist

    from ecdit_dist.parallel.local import free_port

    importlib.import_module("ecdit_dist.train")    # the modules workers patch are known before the first job
    fresh = FreshState().capture()
    store = None
    if world > 1:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                              timedelta(seconds=timeout))
    results = []
    for i, (name, fn, args) in enumerate(todo):
        if store is not None:
            if rank == 0:
                store.set(f"port/{i}", str(free_port()))
            port = store.get(f"port/{i}").decode()
        else:
            port = str(free_port())
        os.environ["MASTER_PORT"] = port
        try:
            results.append(fn(rank, world, *args))
        except BaseException as e:
            raise RuntimeError(f"job {name!r} ({fn.__name__}, {i + 1} of {len(todo)}) failed on rank {rank}: "
                               f"{type(e).__name__}: {e}") from e
        fresh.restore()
        if store is not None and i + 1 < len(todo):    # every rank done before any starts the next job
            store.set(f"done/{i}/{rank}", "1")
            store.wait([f"done/{i}/{r}" for r in range(world)], timedelta(seconds=timeout))
    return results


def process_state(rank: int, world: int) -> dict[str, Any]:
    """What a job would inherit from the one before it (the test of `jobs`)."""
    import random
    import signal
    import warnings

    import numpy as np
    import torch.distributed as dist

    import ecdit_dist.model.moe as moe
    from ecdit_dist.checkpoint.manager import CheckpointManager
    from ecdit_dist.model import expert_gemm

    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return {"process group": dist.is_initialized(), "dist.all_reduce": dist.all_reduce.__qualname__,
            "moe.expert_choice": moe.expert_choice.__qualname__, "CheckpointManager._commit":
            CheckpointManager._commit.__qualname__, "default dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "autocast": torch.is_autocast_enabled("cpu"),
            "torch.rand": torch.rand(3).tolist(), "random": random.random(), "numpy": float(np.random.rand()),
            "env": os.environ.get("ECDIT_LEFTOVER"), "SIGTERM": str(signal.getsignal(signal.SIGTERM)),
            "wakeup fd": fd, "gemm plans": len(expert_gemm._plans), "warnings": [f[0] for f in warnings.filters]}


def leave_state_behind(rank: int, world: int) -> dict[str, Any]:
    """Change everything `process_state` looks at and leave it so; returns what it then sees."""
    import random
    import warnings

    import numpy as np
    import torch.distributed as dist

    import ecdit_dist.model.moe as moe
    from ecdit_dist.checkpoint.manager import CheckpointManager
    from ecdit_dist.model import expert_gemm
    from ecdit_dist.preemption import Preemption

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_reduce = lambda *a, **k: None
    moe.expert_choice = lambda *a, **k: None
    CheckpointManager._commit = lambda *a, **k: None
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_autocast_enabled("cpu", True)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    os.environ["ECDIT_LEFTOVER"] = "1"
    Preemption(torch.device("cpu"), False).install()
    expert_gemm._plans[("leftover",)] = None
    warnings.simplefilter("ignore")
    return process_state(rank, world)


def copy_run(rank: int, world: int, src: str, dst: str) -> None:
    """Rank 0 copies a run directory (a job between a save and a resume elsewhere)."""
    import shutil

    if rank == 0:
        shutil.copytree(src, dst)


RUN = "<run dir>"            # in a job table's args: replaced by the job's own run directory


def jobs_per_world(tmp_path_factory, table: dict[str, tuple[int, Any, tuple]]):
    """A module fixture's body: the jobs of `table` (name: (world, fn, args)) run in one spawn per
    world size (`jobs`), when a test first asks for one of them. Returns get(name) -> (results of
    rank 0, 1, ..., the job's run directory). A failed spawn fails each test that asks for one of
    its jobs, with the error naming the job that failed."""
    from ecdit_dist.parallel.local import run_ranks

    cache: dict[int, Any] = {}

    def get(name):
        world = table[name][0]
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            names = [n for n, (w, _, _) in table.items() if w == world]
            runs = {n: tmp / n.replace(" ", "-") for n in names}
            todo = [(n, table[n][1], tuple(str(runs[n]) if a == RUN else a for a in table[n][2])) for n in names]
            try:
                ranks = run_ranks(jobs, world, tmp / "ranks", todo, timeout=240 + 180 * len(todo))
                cache[world] = {n: ([r[i] for r in ranks], runs[n]) for i, n in enumerate(names)}
            except AssertionError as e:
                cache[world] = AssertionError(f"the {world}-rank spawn of {names} failed: {e}")
        if isinstance(cache[world], AssertionError):
            raise cache[world]
        return cache[world][name]

    return get
