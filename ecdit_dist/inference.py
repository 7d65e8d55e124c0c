"""Load a trained model from a checkpoint into one process, for sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, read_meta, verify_checkpoint
from ecdit_dist.config import Config, config_from_dict
from ecdit_dist.data.shapes import ShapesSource
from ecdit_dist.data.text import TinyTextEncoder
from ecdit_dist.model import ECDiT


@dataclass
class SamplingBundle:
    cfg: Config
    model: ECDiT
    text_encoder: TinyTextEncoder
    decode: Callable[[torch.Tensor], torch.Tensor]
    checkpoint: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its newest valid checkpoint; a checkpoint folder -> itself (verified)."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / ".metadata").exists():
        verify_checkpoint(path)
        return path
    found = CheckpointManager(path).latest_valid()
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {path} (expected {path}/checkpoints/step-*/)")
    return found


def load_for_sampling(path: str | Path, use_ema: bool = True) -> SamplingBundle:
    folder = resolve_checkpoint(path)
    cfg = config_from_dict(read_meta(folder)["config"], validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    key = "ema" if use_ema and cfg.optim.ema_decay > 0 else "model"
    state = {key: {k: v for k, v in model.state_dict().items()}}
    CheckpointManager.load(folder, state)
    model.load_state_dict(state[key])
    model.eval()
    source = ShapesSource(cfg.data.num_samples, 2 * cfg.model.latent_size, cfg.data.seed)
    text_encoder = TinyTextEncoder(cfg.model.text_dim, cfg.model.text_len)
    return SamplingBundle(cfg=cfg, model=model, text_encoder=text_encoder, decode=source.vae.decode, checkpoint=folder)
