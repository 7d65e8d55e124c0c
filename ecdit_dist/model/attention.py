"""Self-attention with grouped-query heads and cross-attention to text (paper eq. 2-3).

Kernels (CUDA, bf16): self-attention has no mask and reaches FlashAttention-2 (GQA through
`enable_gqa`, no repeated K/V); cross-attention has an additive padding bias, which
FlashAttention does not take, and reaches the memory-efficient kernel (or cuDNN where
available). On CPU both use the fused flash-style CPU kernel or the math path.

Projections are separate `nn.Linear`s so tensor parallelism can shard them by module
path (q/k/v column-wise, o row-wise). Head counts are read from the tensor shapes,
never from the config, so the same code runs on a tensor-parallel shard that holds
num_heads / tp query heads and num_kv_heads / tp key/value heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, L, _ = x.shape
    return x.view(B, L, -1, head_dim).transpose(1, 2)      # (B, H, L, hd)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool, True = attend -> (B, 1, 1, L) additive bias (0 / -inf) in `dtype`.

    Built once per forward and shared by every cross-attention layer. Its rows are stored
    16-element aligned (a view of a padded buffer), the layout the fused memory-efficient
    kernel needs, so SDPA uses it as it is instead of padding a copy in every layer."""
    B, L = mask.shape
    padded = (L + 15) // 16 * 16
    bias = torch.full((B, 1, 1, padded), float("-inf"), dtype=dtype, device=mask.device)
    bias[..., :L].masked_fill_(mask[:, None, None, :], 0.0)
    return bias[..., :L]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` produce: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim)
        # no key bias: it shifts every score of a query equally, so softmax ignores it (zero gradient)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, S, d)
        q = _heads(self.q_proj(x), self.head_dim)            # (B, H, S, hd)
        k = _heads(self.k_proj(x), self.head_dim)            # (B, Hkv, S, hd)
        v = _heads(self.v_proj(x), self.head_dim)            # (B, Hkv, S, hd)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(o.transpose(1, 2).flatten(2))     # (B, S, d)

    def init_weights(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


class CrossAttention(nn.Module):
    """MHCA(x) = concat_h softmax(Q_x K_y^T / sqrt(hd)) V_y  W_out.

    Q from the image tokens (d -> d); K and V straight from the text embeddings
    (text_dim -> kv_heads * hd, full width by default as in eq. 2); text padding masked.
    The output projection starts at zero, so a new block begins as the identity.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim)
        self.k_proj = nn.Linear(text_dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(text_dim, num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # x (B, S, d); text (B, L, text_dim); text_mask (B, L) bool, True = real token,
        # or the (B, 1, 1, L) additive bias of `attention_bias` (what ECDiT passes)
        q = _heads(self.q_proj(x), self.head_dim)            # (B, H, S, hd)
        k = _heads(self.k_proj(text), self.head_dim)         # (B, Hkv, L, hd)
        v = _heads(self.v_proj(text), self.head_dim)         # (B, Hkv, L, hd)
        bias = text_mask if text_mask.dim() == 4 else attention_bias(text_mask, q.dtype)  # (B, 1, 1, L)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(o.transpose(1, 2).flatten(2))     # (B, S, d)

    def init_weights(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.o_proj.bias)
