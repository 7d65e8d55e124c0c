"""Rectified flow (paper eq. 1): straight paths between data and noise.

    x_t = t * x + (1 - t) * eps,   target velocity v = x - eps,   t = sigmoid(u), u ~ N(mu_t, sigma_t)

t = 1 is data and t = 0 is noise; sampling integrates dx/dt = v from t = 0 to 1 with
Euler steps and classifier-free guidance.

Determinism contract: every random draw of a training sample (noise, timestep, token
mask, text dropout) comes from a generator keyed by (seed, step, global sample index),
so the trajectory does not depend on how many ranks share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_key(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, index, ...)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


@dataclass
class TrainDraws:
    noise: torch.Tensor      # (B, C, H, W)
    t: torch.Tensor          # (B,)
    keep: torch.Tensor | None  # (B, S_keep) sorted token indices, None = no masking
    drop_text: torch.Tensor  # (B,) bool


def draw_training_randomness(seed: int, step: int, sample_ids: Sequence[int], latent_shape: tuple[int, int, int],
                             num_tokens: int, keep_tokens: int, t_mean: float, t_std: float,
                             text_dropout: float) -> TrainDraws:
    """All per-sample random draws of one (micro-)batch; sample_ids are global batch positions."""
    noise, ts, keeps, drops = [], [], [], []
    for idx in sample_ids:
        g = torch.Generator().manual_seed(sample_key(seed, step, idx))
        noise.append(torch.randn(latent_shape, generator=g))
        u = torch.randn((), generator=g) * t_std + t_mean
        ts.append(torch.sigmoid(u))
        if keep_tokens < num_tokens:
            keeps.append(torch.randperm(num_tokens, generator=g)[:keep_tokens].sort().values)
        drops.append(torch.rand((), generator=g) < text_dropout)
    return TrainDraws(
        noise=torch.stack(noise),
        t=torch.stack(ts),
        keep=torch.stack(keeps) if keeps else None,
        drop_text=torch.stack(drops),
    )


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x + (1 - t) eps, t broadcast over (C, H, W)."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return t * x + (1 - t) * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x - noise


@torch.no_grad()
def euler_sample(velocity: Callable[..., torch.Tensor], noise: torch.Tensor, steps: int, cfg_scale: float) -> torch.Tensor:
    """Integrate from noise (t=0) to data (t=1).

    `velocity(x, t, drop_text)` returns v for a batch; with cfg_scale != 1 the
    conditional and null-text predictions run in one doubled batch and are combined
    as v_uncond + s * (v_cond - v_uncond). The doubled batch is interleaved per image,
    (cond 0, uncond 0, cond 1, uncond 1, ...), so one image's two passes are adjacent:
    an MoE group of two images' tokens then holds exactly one prompt (see
    `ecdit_dist.sample.generate`).
    """
    x = noise
    B = x.shape[0]
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    guided = cfg_scale != 1.0
    wide = torch.promote_types(x.dtype, torch.float32)
    drop = torch.tensor([False, True], device=x.device).repeat(B) if guided else None   # (2B,)
    for i in range(steps):
        t = torch.full((B,), ts[i], device=x.device)
        if guided:
            v = velocity(x.repeat_interleave(2, dim=0), t.repeat_interleave(2), drop).to(wide)  # (2B, ...)
            v = v.unflatten(0, (B, 2))                                                         # (B, 2, ...)
            v_cond, v_uncond = v[:, 0], v[:, 1]
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = velocity(x, t, None).to(wide)
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)
    return x
