"""What the trainer asks for: this rank's samples of a global step, their text, and the
per-sample random draws, loaded ahead in a background thread.

The samples of step s are global positions [s * B, (s + 1) * B) of an epoch-wise shuffled
stream (a function of the seed and the step only); data-parallel rank r takes its contiguous
slice. The data position of a run is therefore step x global batch, valid under any layout.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ecdit_dist.config import Config, ConfigError
from ecdit_dist.data.sampler import BlockShuffle, EpochPermutation, rank_positions
from ecdit_dist.data.text import build_text_encoder
from ecdit_dist.diffusion import draw_training_randomness


class DataPipeline:
    def __init__(self, cfg: Config, device: torch.device, dp_rank: int, dp_size: int) -> None:
        self.cfg = cfg
        self.device = device
        self.dp_rank, self.dp_size = dp_rank, dp_size
        mcfg, dcfg = cfg.model, cfg.data
        self.skipped: list[tuple[str, str]] = []
        self.decode = None
        if dcfg.path is None:
            from ecdit_dist.data.shapes import ShapesSource

            shapes = ShapesSource(dcfg.num_samples, 2 * mcfg.latent_size, dcfg.seed)
            self.num_samples = len(shapes)
            self.latent_shape = shapes.latent_shape
            self._load_samples = lambda idx: dict(zip(("latents", "captions"), shapes.batch(idx)),
                                                   ids=torch.as_tensor(idx))
            self.order = EpochPermutation(len(shapes), cfg.seed)
            self.precomputed = False
            self.decode = shapes.vae.decode
            self.fingerprint = f"shapes:{dcfg.seed}:{dcfg.num_samples}:{mcfg.latent_size}"
        else:
            self._init_parquet(cfg)
        self.text_encoder = None if self.precomputed else build_text_encoder(
            dcfg.text_encoder, mcfg.text_dim, mcfg.text_len, device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="data") if dcfg.prefetch else None
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()

    def _init_parquet(self, cfg: Config) -> None:
        from ecdit_dist.data.index import open_dataset_once
        from ecdit_dist.data.shards import ParquetSource

        mcfg, dcfg = cfg.model, cfg.data
        index = open_dataset_once(dcfg.path, on_error=dcfg.on_error, retries=dcfg.retries, mode=dcfg.index)
        self.skipped = index.skipped
        want = (mcfg.in_channels, mcfg.latent_size, mcfg.latent_size)
        if tuple(index.meta["latent_shape"]) != want:
            raise ConfigError(f"the shards in {dcfg.path} hold latents of shape {tuple(index.meta['latent_shape'])}, "
                              f"the model expects {want} (model.in_channels, model.latent_size)")
        has_text = index.has_text()
        if dcfg.text_source == "precomputed" and not has_text:
            raise ConfigError(f"data.text_source=precomputed, but not every shard in {dcfg.path} has text_emb; "
                              f"run `ecdit data encode` or use data.text_source=online")
        self.precomputed = dcfg.text_source == "precomputed" or (dcfg.text_source == "auto" and has_text)
        if self.precomputed and (index.meta["text_dim"], index.meta["text_len"]) != (mcfg.text_dim, mcfg.text_len):
            raise ConfigError(f"the shards' text embeddings are {index.meta['text_len']} x {index.meta['text_dim']} "
                              f"({index.meta['text_encoder']}), the model reads {mcfg.text_len} x {mcfg.text_dim} "
                              f"(model.text_len x model.text_dim)")
        source = ParquetSource(index, dcfg.retries, dcfg.cache_row_groups, want_text=self.precomputed)
        self.num_samples = len(source)
        self.latent_shape = source.latent_shape
        self._load_samples = source.batch
        self.order = BlockShuffle(source.block_sizes(), cfg.seed, dcfg.shuffle_window)
        self.fingerprint = index.fingerprint()
        vae = index.meta.get("toy_vae")
        if vae:
            from ecdit_dist.data.shapes import ToyVAE

            self.decode = ToyVAE(np.array(vae["mean"]), np.array(vae["std"])).decode

    # ------------------------------------------------------------------ loading
    def _load(self, step: int) -> dict[str, Any]:
        cfg, mcfg = self.cfg, self.cfg.model
        gb = cfg.train.global_batch_size
        positions = rank_positions(step, gb, self.dp_rank, self.dp_size)
        batch = self._load_samples(self.order(positions))
        slot = positions - step * gb                        # global sample index within the step
        batch["draws"] = draw_training_randomness(
            cfg.seed, step, slot.tolist(), self.latent_shape, mcfg.tokens_per_image, mcfg.train_tokens_per_image,
            cfg.diffusion.t_mean, cfg.diffusion.t_std, cfg.diffusion.text_dropout)
        return batch

    def load(self, step: int) -> dict[str, Any]:
        """This rank's samples of `step` (CPU tensors) and the text (on the training device)."""
        with self.lock:
            fut = self.pending.pop(step, None)
            for s in list(self.pending):                  # a resume or jump: drop stale prefetches
                if s < step:
                    self.pending.pop(s)
        batch = fut.result() if fut is not None else self._load(step)
        if self.pool is not None:
            with self.lock:
                for s in range(step + 1, step + 1 + self.cfg.data.prefetch):
                    if s < self.cfg.train.steps and s not in self.pending:
                        self.pending[s] = self.pool.submit(self._load, s)
        if not self.precomputed:
            batch["text"], batch["text_mask"] = self.text_encoder.encode(batch["captions"])
        return batch

    def state(self, step: int) -> dict[str, Any]:
        return {"position": step * self.cfg.train.global_batch_size, "epoch_size": self.num_samples,
                "fingerprint": self.fingerprint, "skipped_shards": [p for p, _ in self.skipped]}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
