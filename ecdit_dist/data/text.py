"""Text encoders: captions -> (embeddings (B, L, D), mask (B, L)).

`TinyTextEncoder` is the embedded, download-free encoder of the shapes data: a word
vocabulary with a frozen, seeded embedding table plus sine-cosine positions. It has no
trainable parameters; the DiT's cross-attention learns to read it.
"""

from __future__ import annotations

import math
import re
from typing import Protocol

import torch

from ecdit_dist.data.shapes import COLOURS, COUNT_WORDS, POSITIONS, SHAPES


class TextEncoder(Protocol):
    dim: int
    max_len: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def _vocabulary() -> list[str]:
    words = ["<pad>", "<unk>", "a", "an", "and", "at", "the", "in", "of", "on", "with"]
    words += list(COUNT_WORDS.values()) + list(COLOURS)
    words += [w for s in SHAPES for w in (s, s + "s")]
    words += sorted({w for p in POSITIONS for w in p.split()})
    return list(dict.fromkeys(words))


class TinyTextEncoder:
    def __init__(self, dim: int, max_len: int, seed: int = 1234) -> None:
        self.dim = dim
        self.max_len = max_len
        self.vocab = _vocabulary()
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(self.vocab), dim, generator=g)
        self.table[0] = 0
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self.positions = 0.5 * pe

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), self.max_len, dtype=torch.long)
        for row, text in enumerate(captions):
            words = re.findall(r"[a-z]+", text.lower())[: self.max_len] or ["<unk>"]
            ids[row, : len(words)] = torch.tensor([self.ids.get(w, 1) for w in words])
        return ids, ids != 0

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        emb = self.table[ids] + self.positions[None]                    # (B, L, D)
        return emb * mask[..., None], mask
