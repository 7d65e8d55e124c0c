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

from ecdit_dist.config import ConfigError
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


class T5TextEncoder:
    """A frozen T5 encoder from a local folder (config, safetensors weights, spiece.model);
    nothing is fetched. Runs without gradients, in bf16 on CUDA."""

    def __init__(self, path: str, max_len: int, device: torch.device | str = "cpu") -> None:
        from pathlib import Path

        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(path)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"data.text_encoder: {folder} holds no config.json of a T5 encoder")
        if not (folder / "spiece.model").exists() and not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"data.text_encoder: {folder} holds no spiece.model / tokenizer.json")
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # from a folder: T5Tokenizer(vocab_file=...) would silently ignore the file in transformers 5
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                    dtype=dtype).to(device).eval().requires_grad_(False)
        self.device = device
        self.dim = self.model.config.d_model
        self.max_len = max_len
        self.name = folder.name
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"{folder}: tokenizer has {self.tokenizer.vocab_size} ids, the model "
                             f"{self.model.config.vocab_size}")

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(captions, max_length=self.max_len, padding="max_length", truncation=True,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"].bool()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return out.float() * mask.to(self.device)[..., None], mask.to(self.device)


def t5_width(path: str) -> int:
    """d_model of the T5 encoder in a local folder, read from its config.json (no weights loaded)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"data.text_encoder: {path} holds no config.json of a T5 encoder")
    width = json.loads(config.read_text()).get("d_model")
    if not isinstance(width, int):
        raise ValueError(f"data.text_encoder: {config} has no integer d_model")
    return width


def build_text_encoder(spec: str, dim: int | None, max_len: int, device: torch.device | str = "cpu") -> TextEncoder:
    """'tiny' (the embedded encoder, width `dim`) or the path of a local T5 encoder folder, whose
    width must equal `dim` (model.text_dim); checked before its weights are loaded. dim=None
    takes the T5 encoder's own width."""
    if spec == "tiny":
        if dim is None:
            raise ValueError("the tiny text encoder needs a width (model.text_dim)")
        return TinyTextEncoder(dim, max_len)
    width = t5_width(spec)
    if dim is not None and width != dim:
        raise ConfigError(f"data.text_encoder {spec!r} produces embeddings of width {width} (its d_model), but "
                          f"model.text_dim is {dim}; set model.text_dim={width}, or use an encoder of width {dim}")
    return T5TextEncoder(spec, max_len, device)
