"""The embedded dataset: coloured shapes at positions, in counts, with captions.

Sample i is a pure function of (seed, i): "two red circles at the top left" rendered
on a dark background, then mapped by a fixed linear "VAE" (an orthonormal colour x
2x2-Haar transform keeping 8 of 12 coefficients, per-channel normalised) to an
8-channel latent at half the resolution. It needs no download and a model trained on
it for a few minutes on a CPU draws shapes a person can check against the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.7, 0.2, 0.9), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS: dict[str, tuple[float, float]] = {   # (row, col) centre as a fraction of the side
    "top left": (0.27, 0.27), "top right": (0.27, 0.73), "bottom left": (0.73, 0.27),
    "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}
BACKGROUND = (0.08, 0.08, 0.1)


@dataclass(frozen=True)
class Scene:
    count: int
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} at the {self.position}"


def scene(seed: int, index: int) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng([seed, index])
    s = Scene(count=int(rng.integers(1, 4)), colour=str(rng.choice(list(COLOURS))),
              shape=str(rng.choice(SHAPES)), position=str(rng.choice(list(POSITIONS))))
    return s, rng


def render(s: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) float32 image in [0, 1], 2x supersampled."""
    ss = 2 * size
    cy, cx = (np.array(POSITIONS[s.position]) * ss)
    r = ss * (0.085 if s.count == 1 else 0.065)
    spread = ss * 0.14
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == s.count:
            break
        y, x = cy + rng.uniform(-spread, spread), cx + rng.uniform(-spread, spread)
        if all(math.hypot(y - a, x - b) > 2.3 * r for a, b in centres):
            centres.append((y, x))
    yy, xx = np.mgrid[0:ss, 0:ss].astype(np.float32) + 0.5
    inside = np.zeros((ss, ss), dtype=bool)
    for y, x in centres:
        if s.shape == "circle":
            inside |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        elif s.shape == "square":
            h = 0.85 * r
            inside |= (np.abs(yy - y) <= h) & (np.abs(xx - x) <= h)
        else:  # upward triangle: apex at the top, base below
            top, base = y - r, y + 0.8 * r
            half_width = r * (yy - top) / (base - top)
            inside |= (yy >= top) & (yy <= base) & (np.abs(xx - x) <= half_width)
    img = np.empty((3, ss, ss), dtype=np.float32)
    for c in range(3):
        img[c] = np.where(inside, COLOURS[s.colour][c], BACKGROUND[c])
    return img.reshape(3, size, 2, size, 2).mean(axis=(2, 4))


def _basis() -> np.ndarray:
    """(8, 12) orthonormal rows over a 2x2 RGB block ordered (channel, dy, dx)."""
    colour = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=np.float64)
    colour /= np.linalg.norm(colour, axis=1, keepdims=True)          # luma, red-green, yellow-blue
    haar = 0.5 * np.array([[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], dtype=np.float64)
    full = np.kron(colour, haar)                                      # rows: colour x (LL, LH, HL, HH)
    keep = [0, 4, 8, 1, 2, 3, 5, 9]   # three LL, then luma details, then LH of both chroma axes
    return full[keep]


class ToyVAE:
    """Fixed linear image <-> latent map: (B, 3, H, W) in [-1, 1] <-> (B, 8, H/2, W/2)."""

    channels = 8

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.basis = torch.from_numpy(_basis()).float()                   # (8, 12)
        self.mean = torch.zeros(8) if mean is None else torch.as_tensor(mean).float()
        self.std = torch.ones(8) if std is None else torch.as_tensor(std).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        blocks = images.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H // 2, W // 2, 12)
        z = blocks @ self.basis.T                                          # (B, h, w, 8)
        z = (z - self.mean) / self.std
        return z.permute(0, 3, 1, 2).contiguous()                          # (B, 8, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        B, _, h, w = latents.shape
        z = latents.permute(0, 2, 3, 1).float() * self.std + self.mean     # (B, h, w, 8)
        blocks = z @ self.basis                                            # (B, h, w, 12)
        img = blocks.view(B, h, w, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, 2 * h, 2 * w)
        return img.clamp(-1, 1)


class ShapesSource:
    """Random-access embedded dataset: index -> (latent (8, h, w), caption)."""

    def __init__(self, num_samples: int, image_size: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.vae = ToyVAE()
        # normalise: per-channel mean, one global scale (keeps the detail channels small, as a VAE would)
        probe = self.vae.encode(self.images(range(min(256, num_samples)))[0])
        mean = probe.mean(dim=(0, 2, 3))
        scale = (probe - mean.view(1, -1, 1, 1)).std().clamp_min(1e-3)
        self.vae = ToyVAE(mean=mean.numpy(), std=scale.expand(8).numpy())

    def __len__(self) -> int:
        return self.num_samples

    def images(self, indices) -> tuple[torch.Tensor, list[str]]:
        imgs, caps = [], []
        for i in indices:
            if not 0 <= int(i) < self.num_samples:
                raise IndexError(f"sample {i} outside the embedded dataset of {self.num_samples}")
            s, rng = scene(self.seed, int(i))
            imgs.append(render(s, rng, self.image_size))
            caps.append(s.caption)
        return torch.from_numpy(np.stack(imgs)) * 2 - 1, caps              # (B, 3, H, W) in [-1, 1]

    def batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        imgs, caps = self.images(indices)
        return self.vae.encode(imgs), caps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (8, self.image_size // 2, self.image_size // 2)
