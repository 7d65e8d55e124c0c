"""Text-to-image sampling: Euler ODE with classifier-free guidance, and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ecdit_dist.diffusion import euler_sample, sample_key
from ecdit_dist.model import ECDiT


def _batch_multiple(tokens_per_image: int, group: int, copies: int) -> int:
    """Smallest image count n with n * copies * tokens_per_image divisible by group."""
    per = tokens_per_image * copies
    return group // math.gcd(group, per)


def routes_prompts_alone(model: ECDiT, guided: bool) -> bool:
    """True when, in `generate`, no MoE group holds tokens of two different prompts, so that an
    image depends only on its own prompt, noise and seed, never on the rest of the batch.

    A prompt occupies tokens_per_image tokens per pass, and two passes (conditional, then
    null text, adjacent) with guidance. Groups of `moe.eval_group_size` consecutive tokens
    stay inside one prompt exactly when that size divides the prompt's tokens. Dense
    models, and token choice without a capacity limit, route every token on its own.
    """
    moe = model.moe_config
    if not moe.num_experts or (moe.router == "token_choice" and moe.token_capacity_factor is None):
        return True
    per_prompt = model.config.tokens_per_image * (2 if guided else 1)
    return per_prompt % moe.eval_group_size == 0


@torch.no_grad()
def generate(model: ECDiT, text: torch.Tensor, text_mask: torch.Tensor, steps: int, cfg_scale: float,
             seed: int, autocast_dtype: torch.dtype | None = None, token_split: int = 1) -> torch.Tensor:
    """Latents (B, C, H, W) for B text conditions. Noise of image i is keyed by (seed, i).

    Expert choice routes groups of `moe.eval_group_size` consecutive tokens together,
    so which prompts share a group decides what an image may depend on. With guidance
    (cfg_scale != 1) the passes run as (cond 0, uncond 0, cond 1, uncond 1, ...):

    * eval group = two images (the paper's 512 tokens at 256 tokens per image): each
      group is one prompt's conditional and null-text pass, and a guided image depends
      only on its prompt, noise and seed, whatever else is in the batch;
    * eval group dividing one image (or, with guidance, dividing two images' tokens):
      the same holds;
    * any other size (e.g. four images, or two without guidance): consecutive prompts
      share groups and choose experts together, so an image also depends on its
      neighbours in the batch. The batch is then padded with copies of its last
      condition (with their own noise) up to a whole number of groups; the padding joins
      the last group and is dropped afterwards.

    `routes_prompts_alone(model, guided)` says which case applies.

    `token_split`: the number of ranks each MoE layer splits its tokens over (the tensor-parallel
    size of a sharded model, whose ranks all call `generate` with the same arguments). The batch
    is then padded so that every rank's contiguous share holds whole groups, the same groups one
    process forms: the padding only adds whole groups after the real images, which change nothing.
    """
    mcfg = model.config
    param = next(model.parameters())
    device = param.device
    dtype = torch.promote_types(param.dtype, torch.float32)   # float64 models sample in float64
    B = text.shape[0]
    copies = 1 if cfg_scale == 1.0 else 2
    if token_split < 1:
        raise ValueError(f"token_split must be at least 1, got {token_split}")
    mult = _batch_multiple(mcfg.tokens_per_image, model.moe_config.eval_group_size * token_split, copies) \
        if model.moe_config.num_experts else 1
    padded = math.ceil(B / mult) * mult
    if padded != B:
        text = torch.cat([text, text[-1:].expand(padded - B, *text.shape[1:])])
        text_mask = torch.cat([text_mask, text_mask[-1:].expand(padded - B, *text_mask.shape[1:])])
    shape = (mcfg.in_channels, mcfg.latent_size, mcfg.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_key(seed, 0x5A, i)))
                         for i in range(padded)]).to(device, dtype)
    text, text_mask = text.to(device, dtype), text_mask.to(device)
    # euler_sample interleaves the guided batch per image: (cond i, uncond i) adjacent
    text2, mask2 = text.repeat_interleave(2, dim=0), text_mask.repeat_interleave(2, dim=0)

    def velocity(x: torch.Tensor, t: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        txt, msk = (text, text_mask) if drop is None else (text2, mask2)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return model.velocity(x, t, txt, msk, drop_text=drop)

    was_training = model.training
    model.eval()
    try:
        out = euler_sample(velocity, noise, steps, cfg_scale)
    finally:
        model.train(was_training)
    return out[:B].to(dtype).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: np.ndarray, rows: int, labels: list[str], path: str | Path, scale: int = 4) -> Path:
    """Write a PNG grid with one labelled row per prompt; written to a temporary name, then renamed."""
    from PIL import Image, ImageDraw

    B, H, W, _ = images.shape
    cols = math.ceil(B / rows)
    label_h = 14
    tile_h, tile_w = H * scale, W * scale
    canvas = Image.new("RGB", (cols * (tile_w + 2) + 2, rows * (tile_h + label_h + 2) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y0 = 2 + r * (tile_h + label_h + 2)
        draw.text((4, y0), labels[r] if r < len(labels) else "", fill=(0, 0, 0))
        for c in range(cols):
            i = r * cols + c
            if i >= B:
                break
            tile = Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (2 + c * (tile_w + 2), y0 + label_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def sample_grid(model: ECDiT, text_encoder, decode, prompts: list[str], per_prompt: int, steps: int,
                cfg_scale: float, seed: int, path: str | Path, autocast_dtype: torch.dtype | None = None,
                token_split: int = 1) -> Path:
    """Generate `per_prompt` images per prompt and write them as one labelled row per prompt
    (`token_split`: see `generate`)."""
    texts = [p for p in prompts for _ in range(per_prompt)]
    emb, mask = text_encoder.encode(texts)
    latents = generate(model, emb, mask, steps, cfg_scale, seed, autocast_dtype, token_split)
    return save_grid(to_uint8(decode(latents)), len(prompts), prompts, path)
