"""The training loop, in one process or on many. Also the torchrun entry point:

    torchrun --nproc_per_node=4 -m ecdit_dist.train --config configs/tiny-cpu.yaml --set parallel.tp=2 parallel.ep=2
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, Dist, read_meta
from ecdit_dist.config import Config, ConfigError, dump_config, load_config
from ecdit_dist.data.pipeline import DataPipeline
from ecdit_dist.data.storage import DataError
from ecdit_dist.device import (autocast_dtype, enable_tf32, keep_host_memory, process_group_backend, select_device,
                               to_device)
from ecdit_dist.diffusion import interpolate, velocity_target
from ecdit_dist.guard import NonFiniteError, NonFiniteGuard, all_finite
from ecdit_dist.metrics import MetricsLogger
from ecdit_dist.model import ECDiT, patchify
from ecdit_dist.model.moe import TokenChoiceMoE
from ecdit_dist.optim import EMA, build_optimizer, lr_factor, set_lr
from ecdit_dist.parallel.dims import ParallelDims
from ecdit_dist.parallel.init import init_from_seed
from ecdit_dist.parallel.parallelize import (clip_grad_norm, clip_grads_to_norm, finish_gradients, parallelize,
                                             set_gradient_sync)
from ecdit_dist.parallel.sampling import ema_weights, sample_with_peers
from ecdit_dist.preemption import EXIT_PREEMPTED, Preemption
from ecdit_dist.step_report import StepReport

META_INIT_THRESHOLD = 2_000_000_000


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        rank, world, local_rank = launch_env()
        self.device = select_device(local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        enable_tf32(self.device.type)
        self.host_memory = keep_host_memory(cfg.train.host_memory, self.device.type)
        # SIGTERM / SIGUSR1 from here on: all ranks save the step they reach and stop (ecdit_dist/preemption.py)
        self.preemption = Preemption(self.device, world > 1).install()
        # every check runs before the first collective, so a bad layout fails the same way on every rank
        self.dims = ParallelDims.from_config(cfg, world, self.device.type)
        backend = process_group_backend(cfg.parallel.backend, self.device.type)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.parallel.timeout_s),
                                    device_id=self.device if self.device.type == "cuda" else None)
        self.dims.build_meshes()
        self.rank = rank
        self.is_main = rank == 0
        coords = self.dims.coords(rank)
        self.dp_rank, self.dp_size = coords["dp"], self.dims.dp
        self.tp_rank = coords["tp"]
        self.run_dir = Path(cfg.run.dir)
        self.autocast_dtype = autocast_dtype(cfg.train.precision, self.device.type)

        self.model = self.build_model()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

        self.data = DataPipeline(cfg, self.device, self.dp_rank, self.dp_size)
        ck = cfg.checkpoint
        # checkpoint work agrees over CPU (gloo) groups of its own (a second one for the background save)
        self.checkpoints = CheckpointManager(
            self.run_dir, ck.keep_last, ck.keep_every, Dist.create(ck.timeout_s), mirror=ck.mirror,
            async_dist=Dist.create(ck.timeout_s) if ck.async_save else None, mirror_required=ck.mirror_required,
            mirror_claim=ck.mirror_claim, retries=cfg.data.retries)
        self.step = 0
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.nonfinite_patience, self.device,
                                    self.dims.world)
        self.data_offset = 0     # steps of data skipped by non-finite rollbacks: step s trains on batch s + offset
        from ecdit_dist.profiling.training import TrainingProfiler

        self.profiler = TrainingProfiler(cfg, self.model, self.optimizer, rank, self.device, self.run_dir)

    def build_model(self) -> ECDiT:
        cfg = self.cfg
        init = cfg.train.init
        if init == "auto":
            from ecdit_dist.params import count_params

            big = count_params(cfg.model, cfg.moe)["backbone_params"] > META_INIT_THRESHOLD
            init = "meta" if big and self.dims.world > 1 else "full"
        torch.manual_seed(cfg.seed)
        # both paths take their values from init_from_seed: the same weights on every layout and device
        if init == "full":
            with torch.device("meta"):
                model = ECDiT(cfg.model, cfg.moe)
            model.to_empty(device=self.device)
            init_from_seed(model, cfg.seed)
            return parallelize(model, self.dims, cfg)
        with torch.device("meta"):
            model = ECDiT(cfg.model, cfg.moe)
        model = parallelize(model, self.dims, cfg)
        model.to_empty(device=self.device)
        init_from_seed(model, cfg.seed)
        return model

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different data (tp ranks hold copies)."""
        if self.dims.world > 1:
            t = t.detach().clone()
            for dim in ("dp_replicate", "dp_shard"):
                if getattr(self.dims, dim) > 1:
                    dist.all_reduce(t, group=self.dims.group("dense", dim))
        return t

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            # per-sample randomness is keyed by (seed, step, index); the global RNG is kept for completeness
            "trainer": {"step": torch.tensor(self.step), "rng": torch.get_rng_state(),
                        "data_offset": torch.tensor(self.data_offset)},
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def resume(self) -> bool:
        """Collective: check the run folder, load the newest valid checkpoint (local, else the mirror's)
        after checking that this config may continue it, and claim the mirror prefix."""
        from ecdit_dist.checkpoint.resume_check import compare

        ck = self.cfg.checkpoint
        self.checkpoints.check_shared_filesystem()
        folder = None
        if ck.resume:
            full = ck.verify == "sha256"
            folder = self.checkpoints.latest_valid(full_verify=full)
            if folder is None and ck.mirror:
                folder = self.checkpoints.fetch_from_mirror(full)
                if folder is not None and self.is_main:
                    print(f"fetched {folder.name} from {ck.mirror}", flush=True)
        if folder is not None:
            meta = read_meta(folder)
            phase = compare(meta.get("config", {}), self.cfg.to_dict(), meta.get("data", {}).get("fingerprint"),
                            self.data.fingerprint, folder, ck.allow_changes)
            self.load_checkpoint(folder)
            self.checkpoints.run_id = meta.get("run_id")
            if self.is_main:
                kind = "" if "optim" in meta.get("contents", ["optim"]) else " (weights only: fresh optimizer state)"
                print(f"resumed from {folder} at step {self.step}{kind}", flush=True)
                if phase:
                    print(f"training phase changes: {'; '.join(phase)}", flush=True)
        self.checkpoints.check_mirror_owner()
        return folder is not None

    def load_checkpoint(self, folder: Path) -> None:
        """Collective: model, optimizer, EMA and trainer state from a committed checkpoint."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        meta = read_meta(folder)
        contents = set(meta.get("contents", ["model", "optim", "trainer", "ema"]))
        state = {k: v for k, v in self.state().items() if k in contents}
        for key in ("rng", "data_offset"):
            if "trainer" in state and key not in meta.get("trainer_keys", ["step", "rng"]):
                state["trainer"].pop(key)
        self.checkpoints.load(folder, state)
        set_model_state_dict(self.model, state["model"])
        if "optim" in state:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        if self.ema is not None and "ema" not in state:      # weights-only checkpoint: EMA starts at the weights
            self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        self.step = int(state["trainer"]["step"])
        self.data_offset = int(state["trainer"].get("data_offset", 0))
        if "rng" in state["trainer"]:
            torch.set_rng_state(state["trainer"]["rng"])

    def save(self, async_save: bool = False) -> Path | None:
        # never a checkpoint of non-finite weights (agreed across ranks like the step verdict)
        if not self.guard.agree(all_finite([p.detach() for p in self.model.parameters()]
                                           + list(self.ema.state_dict().values() if self.ema else []))):
            if self.is_main:
                print(f"not saving step {self.step}: the weights are not finite", file=sys.stderr, flush=True)
            return None
        state = self.state()
        meta = {"config": self.cfg.to_dict(), "contents": sorted(state), "trainer_keys": sorted(state["trainer"]),
                "data": self.data.state(self.step + self.data_offset),
                "healthy": self.guard.consecutive == 0,       # the last step was finite
                "layout": {"world": self.dims.world, "dp_replicate": self.dims.dp_replicate,
                           "dp_shard": self.dims.dp_shard, "tp": self.dims.tp, "ep": self.dims.ep}}
        return self.checkpoints.save(self.step, state, meta, async_save=async_save)

    # ------------------------------------------------------------------ one step
    def batch(self, step: int):
        """This rank's samples of global step `step`: latents, text, mask and the per-sample draws."""
        b = self.data.load(step + self.data_offset)
        self.last_ids = b["ids"]
        return b["latents"], b["text"], b["text_mask"], b["draws"]

    def forward_loss(self, x, text, text_mask, noise, t, keep, drop) -> torch.Tensor:
        """Per-sample velocity MSE on the kept tokens, (b,)."""
        p = self.cfg.model.patch_size
        target = patchify(velocity_target(x, noise), p)                     # (b, S, p*p*C)
        if keep is not None:
            target = torch.gather(target, 1, keep.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self.model(interpolate(x, noise, t), t, text, text_mask, keep=keep, drop_text=drop)
        return (pred.float() - target).pow(2).mean(dim=(1, 2))

    def backward_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's micro-batches of `step`, then the gradient
        corrections of the layout. Returns this rank's (sum of per-sample losses, aux loss)."""
        cfg = self.cfg
        per_rank = cfg.train.global_batch_size // self.dp_size
        micro = cfg.train.micro_batch_size or per_rank
        latents, text, text_mask, draws = self.batch(step)
        dev = self.device
        loss_sum = torch.zeros((), device=dev)
        aux_sum = torch.zeros((), device=dev)
        micro_batches = list(range(0, per_rank, micro))
        for start in micro_batches:
            sl = slice(start, start + micro)
            # one pinned, non-blocking host-to-device copy per micro-batch (a no-op on CPU)
            x, txt, msk, noise, t, keep, drop = to_device(
                [latents[sl], text[sl], text_mask[sl], draws.noise[sl], draws.t[sl],
                 draws.keep[sl] if draws.keep is not None else None, draws.drop_text[sl]], dev)
            # under accumulation, FSDP reduce-scatters only after the last micro-batch
            set_gradient_sync(self.model, start == micro_batches[-1], cfg)
            per_sample = self.forward_loss(x, txt, msk, noise, t, keep, drop)
            loss = per_sample.sum() / per_rank
            # each tp rank routes its own share of the tokens: their aux losses average over tp
            aux = self.aux_loss() * (micro / per_rank / self.dims.tp)
            (loss + cfg.moe.aux_loss_weight * aux).backward()
            loss_sum += per_sample.detach().sum()
            aux_sum += aux.detach()
        finish_gradients(self.model, self.dims)
        return loss_sum, aux_sum

    def train_step(self, step: int, log: bool = False) -> dict[str, Any]:
        """One optimizer step (or a skip / rollback by the non-finite guard). The host reads the
        device once, after the gradient norm and before the update: the step report (see
        ecdit_dist/step_report.py). `log` adds the routing statistics to that read."""
        cfg = self.cfg
        lr = cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.steps)
        set_lr(self.optimizer, lr)
        loss_sum, aux_sum = self.backward_step(step)
        params = list(self.model.parameters())
        grad_norm = clip_grad_norm(params, 0.0)          # the norm of the raw gradients (every rank holds it)
        token_choice = self.token_choice
        report = StepReport(self.device, self.dims.world > 1)
        report.add("nonfinite", self.guard.nonfinite_here(loss_sum, grad_norm))
        report.add("preempt", float(self.preemption.requested))
        report.add("loss", loss_sum, contribute=self.tp_rank == 0)     # tp ranks hold copies of the loss
        report.add("grad_norm", grad_norm, contribute=self.is_main)
        if token_choice:
            report.add("aux", aux_sum)
        routing = self._routing_entries(report) if log else []
        got = report.read()                              # the step's one host read (a collective)
        if step + 1 < cfg.train.steps:                  # a signal during the last step: the run is complete
            self.preemption.settle(got["preempt"] > 0)
        out: dict[str, Any] = {}
        if self.guard.verdict(got["nonfinite"]):
            self.guard.record_finite()
            clip_grads_to_norm(params, grad_norm, cfg.optim.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step)
        else:
            action = self.guard.on_nonfinite(step, lambda: self._nonfinite_culprit(loss_sum))
            if self.is_main:
                print(f"step {step}: non-finite loss or gradient; {action} "
                      f"({self.guard.skipped_total} steps not applied so far)", file=sys.stderr, flush=True)
            if action == "rollback":
                self.optimizer.zero_grad(set_to_none=True)
                out["rollback_to"] = self.rollback(step)
        self.optimizer.zero_grad(set_to_none=True)
        out.update({"loss": got["loss"] / cfg.train.global_batch_size, "lr": lr, "grad_norm": got["grad_norm"],
                    "nonfinite/skipped_steps": self.guard.skipped_total})
        if token_choice:
            out["aux_loss"] = got["aux"] / self.dp_size      # mean over data-parallel ranks, summed over tp
        out.update({name: got[name] for name in routing})
        return out

    @functools.cached_property
    def token_choice(self) -> bool:
        """The model routes by token choice (adds an auxiliary loss to the step report); fixed at build."""
        return any(isinstance(m, TokenChoiceMoE) for m in self.model.moe_layers())

    def _routing_entries(self, report: StepReport) -> list[str]:
        """The first rank's routing statistics of this step, as step-report entries; their names."""
        names = []
        for i, block in enumerate(self.model.blocks):
            if block.is_moe and block.ffn.stats is not None:
                for j, what in enumerate(("experts_per_token_mean", "experts_per_token_max", "unchosen_share")):
                    name = f"moe/layer{i}/{what}"
                    report.add(name, block.ffn.stats[j], contribute=self.is_main)
                    names.append(name)
        return names

    def _nonfinite_culprit(self, loss_sum: torch.Tensor) -> str:
        from ecdit_dist.parallel.ac import clean_fqn

        named = [("loss", loss_sum)]
        named += [(f"{clean_fqn(n)} (gradient)", p.grad) for n, p in self.model.named_parameters()]
        return self.guard.culprit(self.rank, named)

    def rollback(self, bad_step: int) -> int:
        """Reload the newest checkpoint and skip the data from it up to and including `bad_step`;
        returns the step training continues from (collective)."""
        self.checkpoints.wait()
        folder = self.checkpoints.latest_valid(full_verify=self.cfg.checkpoint.verify == "sha256")
        if folder is None:
            raise NonFiniteError(f"step {bad_step}: non-finite loss or gradient and no checkpoint to roll back to "
                                 f"(train.on_nonfinite=rollback needs checkpoint.interval > 0)")
        data_step = bad_step + self.data_offset
        self.load_checkpoint(folder)
        self.data_offset = data_step + 1 - self.step
        if self.is_main:
            print(f"rolled back to {folder.name}; step {self.step} continues with the data of step "
                  f"{self.step + self.data_offset}", file=sys.stderr, flush=True)
        return self.step

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.model.moe_layers() if getattr(m, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            print(f"layout: {self.dims.describe()}", flush=True)
            print(f"host memory: {self.host_memory} (train.host_memory)", flush=True)
        self.resume()
        if self.is_main:     # after the resume check: a refused config never replaces the run's
            from ecdit_dist.checkpoint.resume_check import write_run_config

            write_run_config(self.run_dir, dump_config(cfg), self.step)
        logger = MetricsLogger(self.run_dir, self.is_main, cfg.logging.tensorboard, after_step=self.step)
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (self.is_main and cfg.logging.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, n0 = time.perf_counter(), self.step
        try:
            while self.step < cfg.train.steps:
                step = self.step
                self.profiler.begin(step)
                log = (step + 1) % cfg.logging.interval == 0 or step + 1 == cfg.train.steps
                values = self.train_step(step, log=log)
                self.profiler.end(step)
                if "rollback_to" in values:          # the non-finite guard reloaded a checkpoint
                    self.step = values["rollback_to"]
                    if self.preemption.stopped:
                        break
                    continue
                self.step = step + 1
                if log:
                    elapsed = time.perf_counter() - t0
                    rate = (self.step - n0) / max(elapsed, 1e-9)
                    last = {k: float(v) for k, v in values.items()}
                    if self.data.skipped:
                        last["data/skipped_shards"] = len(self.data.skipped)
                    last["steps_per_s"] = rate
                    last["images_per_s"] = rate * cfg.train.global_batch_size
                    last.update(self.profiler.metrics())
                    logger.log(self.step, last)
                    self.profiler.log_histograms(logger, self.step)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    t0, n0 = time.perf_counter(), self.step
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step < cfg.train.steps:
                    self.save(async_save=cfg.checkpoint.async_save)
                bar.update(1)
                # every rank read the same preemption verdict in this step's report
                if self.step < cfg.train.steps and self.preemption.stopped:
                    break
            self.checkpoints.wait()
            if self.step not in self.checkpoints.committed_steps():
                self.save()
            if self.preemption.stopped:
                if self.is_main:
                    print(f"preempted: saved step {self.step}; run the same command again to resume", flush=True)
                return last
            if cfg.sample.at_end:
                path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
                if self.sample_grid(path) is not None:
                    print(f"wrote samples to {path}", flush=True)
        finally:
            self.profiler.close()
            bar.close()
            logger.close()
        return last

    def sample_grid(self, path: Path) -> Path | None:
        from ecdit_dist.data.text import build_text_encoder
        from ecdit_dist.sample import sample_grid

        cfg = self.cfg
        if self.data.decode is None:
            if self.is_main:
                print("sample grid skipped: the shards do not say how to decode their latents", flush=True)
            return None
        encoder = self.data.text_encoder or build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim,
                                                               cfg.model.text_len, self.device)
        args = (encoder, self.data.decode, cfg.sample.prompts, cfg.sample.per_prompt, cfg.sample.steps,
                cfg.sample.cfg_scale, cfg.seed, path, self.autocast_dtype)
        use_ema = cfg.sample.use_ema and self.ema is not None
        if self.dims.world == 1:
            model = self.model
            if use_ema:
                model = copy.deepcopy(self.model)
                self.ema.copy_to(model)
            return sample_grid(model, *args)
        # every rank runs the same prompts through the sharded model (a collective forward; under
        # tensor parallelism the batch is padded to whole routing groups per tp rank): no full copy
        # of the model anywhere, nobody waits
        with ema_weights(self.model, self.ema if use_ema else None):
            if self.is_main:
                return sample_grid(self.model, *args, token_split=self.dims.tp)
            sample_with_peers(self.model, *args, token_split=self.dims.tp)
        return None

    def run(self) -> dict[str, Any]:
        """fit(), then leave the process group (waiting for the other ranks only after success)."""
        ok = False
        try:
            result = self.fit()
            ok = True
            return result
        finally:
            self.close(clean=ok)

    def close(self, clean: bool = True) -> None:
        """Leave the process group; wait for the other ranks only after a successful run (after a
        failure they may never arrive)."""
        self.preemption.uninstall()
        self.data.close()
        if self.dims.world > 1 and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def positive_int(text: str) -> int:
    from ecdit_dist.cli import positive_int as check

    return check(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ecdit train",
        description="Train EC-DiT in one process, or on several ranks under torchrun "
                    "(or with --nproc, which starts torchrun on this machine).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  ecdit train --config configs/tiny-cpu.yaml\n"
               "  ecdit train --config configs/tiny-cpu.yaml --set train.steps=50 run.dir=runs/try\n"
               "  ecdit train --nproc 4 --config configs/tiny-cpu.yaml --set parallel.tp=2 parallel.ep=2\n"
               "  torchrun --nnodes=2 --nproc_per_node=8 ... -m ecdit_dist.train --config FILE\n")
    p.add_argument("--config", required=True, help="YAML run configuration (see configs/ and docs/CONFIG.md)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.steps=100 optim.lr=3e-4")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="start this many ranks on this machine through torchrun (CPU: gloo, GPU: nccl)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device under the layout's shard shapes (no process group), "
                        "print its memory / FLOP / communication plan (docs/PLANNING.md) and exit")
    return p


@record    # under torchrun, a worker's exception becomes the root cause in the agent's failure summary
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            from ecdit_dist.planning import dry_run

            print(dry_run(cfg, args.nproc or int(os.environ.get("WORLD_SIZE", 1))))
            return 0
        if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            ParallelDims.from_config(cfg, args.nproc)      # fail here, not in every rank
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "ecdit_dist.train", "--config", args.config]
            if args.set:
                cmd += ["--set", *args.set]
            env = {**os.environ}
            env.setdefault("OMP_NUM_THREADS", "1")
            os.execvpe(cmd[0], cmd, env)
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank is not None else ''}: {e}", file=sys.stderr)
        if rank is not None:
            get_error_handler().record_exception(e)
        return 2
    try:
        trainer.run()
    except (ConfigError, CheckpointError, NonFiniteError, DataError) as e:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank is not None else ''}: {e}", file=sys.stderr, flush=True)
        if rank is not None:
            get_error_handler().record_exception(e)
        return 2 if isinstance(e, ConfigError) else 1
    return EXIT_PREEMPTED if trainer.preemption.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
