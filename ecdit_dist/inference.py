"""Load a trained model from a checkpoint into one process, for sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ecdit_dist.checkpoint import safe_load
from ecdit_dist.checkpoint.manager import CheckpointError, CheckpointManager, read_meta, verify_checkpoint
from ecdit_dist.config import Config, ConfigError, config_from_dict
from ecdit_dist.data.shapes import ShapesSource, ToyVAE
from ecdit_dist.data.storage import DataError
from ecdit_dist.data.text import TextEncoder, build_text_encoder
from ecdit_dist.model import ECDiT


@dataclass
class SamplingBundle:
    cfg: Config
    model: ECDiT
    text_encoder: TextEncoder
    decode: Callable[[torch.Tensor], torch.Tensor]
    checkpoint: Path
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None   # bf16 on CUDA, None (fp32) on CPU


def resolve_checkpoint(path: str | Path, verify: bool = True) -> Path:
    """A run folder -> its newest valid checkpoint; a checkpoint folder -> itself (verified unless
    `verify` is false; a run folder's candidates are then checked by size only)."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / ".metadata").exists():
        if verify:
            verify_checkpoint(path)
        return path
    found = CheckpointManager(path).latest_valid(full_verify=verify)
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {path} (expected {path}/checkpoints/step-*/)")
    return found


def sampling_device(name: str = "auto") -> torch.device:
    """"auto" = the first GPU when CUDA is available, else the CPU; or an explicit device."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    return device


def load_for_sampling(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                      precision: str = "auto") -> SamplingBundle:
    """The model of a checkpoint on `device` ("auto": a GPU when present), weights loaded on the
    host first. precision "auto" samples in bf16 autocast on CUDA and fp32 on CPU."""
    from ecdit_dist.device import autocast_dtype, enable_tf32

    device = sampling_device(device) if isinstance(device, str) else device
    enable_tf32(device.type)
    folder = resolve_checkpoint(path)
    cfg = config_from_dict(read_meta(folder)["config"], validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    key = "ema" if use_ema and cfg.optim.ema_decay > 0 else "model"
    state = {key: {k: v for k, v in model.state_dict().items()}}
    safe_load.load(state, folder)
    model.load_state_dict(state[key])
    model.to(device).eval()
    if cfg.data.path is None:
        decode = ShapesSource(cfg.data.num_samples, 2 * cfg.model.latent_size, cfg.data.seed).vae.decode
    else:
        import numpy as np

        from ecdit_dist.data.shards import DatasetIndex

        vae = DatasetIndex.build(cfg.data.path, on_error="skip", retries=cfg.data.retries).meta.get("toy_vae")
        if not vae:
            raise DataError(f"the shards in {cfg.data.path} do not say how to decode their latents (no toy_vae)")
        decode = ToyVAE(np.array(vae["mean"]), np.array(vae["std"])).decode
    text_encoder = build_text_encoder(cfg.data.text_encoder, cfg.model.text_dim, cfg.model.text_len, device)
    return SamplingBundle(cfg=cfg, model=model, text_encoder=text_encoder, decode=decode, checkpoint=folder,
                          device=device, autocast_dtype=autocast_dtype(precision, device.type))
