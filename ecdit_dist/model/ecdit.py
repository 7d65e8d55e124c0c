"""EC-DiT: a text-to-image diffusion transformer with expert-choice MoE FFNs.

Block (paper Fig. 2, eq. 2-4), with c the timestep embedding and y the text embeddings:

    x_s = x + gate(c) * SelfAttn(modulate(LN(x), shift(c), scale(c)))
    x'  = x_s + MHCA(LN(x_s), y)                  # the router sees LN(x')
    out = x' + FFN_or_MoE(LN(x'))

With `adaln="attn_ffn"` the FFN/MoE input is modulated and gated too (DiT adaLN-Zero).
Every `moe.interval`-th block, starting with the second, has a MoE instead of the FFN.
Training may drop a share of the image tokens (masked training, `keep`); the loss is
then taken on the kept tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecdit_dist.config import ModelConfig, MoEConfig
from ecdit_dist.model.attention import CrossAttention, SelfAttention, attention_bias, compute_dtype
from ecdit_dist.model.moe import ExpertChoiceMoE, FeedForward, TokenChoiceMoE


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major over patches."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, S, p*p*C) -> (B, C, H, W) for a square grid."""
    B, S, _ = tokens.shape
    n = math.isqrt(S)
    x = tokens.view(B, n, n, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, n * p, n * p)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    half = dim // 2
    emb = torch.cat([one_d(half, yy.reshape(-1)), one_d(dim - half, xx.reshape(-1))], dim=1)
    return emb.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose affine weights follow the input's dtype.

    Under a bf16 weight-gathering policy (FSDP2 mixed precision) the residual stream stays
    fp32 while the gathered weights are bf16; the layer_norm kernels take mixed dtypes only
    the other way round (low-precision input, fp32 weights), so the weights are upcast here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> two-layer MLP of width d."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:      # (B,) -> (B, d)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]     # (B, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)    # (B, freq_dim)
        return self.fc2(F.silu(self.fc1(emb.to(self.fc1.weight.dtype))))

    def init_weights(self) -> None:
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)


class ECDiTBlock(nn.Module):
    def __init__(self, mcfg: ModelConfig, moe: MoEConfig, layer: int) -> None:
        super().__init__()
        d = mcfg.hidden_dim
        self.adaln_ffn = mcfg.adaln == "attn_ffn"
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, mcfg.num_heads, mcfg.num_kv_heads)
        self.norm2 = LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, mcfg.text_dim, mcfg.num_heads, mcfg.cross_kv_heads or mcfg.num_heads)
        self.norm3 = LayerNorm(d, elementwise_affine=not self.adaln_ffn, eps=1e-6)
        self.is_moe = moe.is_moe_layer(layer)
        if not self.is_moe:
            self.ffn: nn.Module = FeedForward(d, mcfg.ffn_hidden)
        elif moe.router == "expert_choice":
            self.ffn = ExpertChoiceMoE(d, mcfg.ffn_hidden, moe.num_experts, moe.capacity_factor,
                                       moe.group_size, moe.eval_group_size, moe.expert_gemm)
        else:
            self.ffn = TokenChoiceMoE(d, mcfg.ffn_hidden, moe.num_experts, moe.top_k,
                                      moe.token_capacity_factor, moe.group_size, moe.eval_group_size)
        self.adaln = nn.Linear(d, (6 if self.adaln_ffn else 3) * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # x (B, S, d); c (B, d); text (B, L, text_dim); text_mask (B, L) bool or (B, 1, 1, L) additive bias
        mod = self.adaln(F.silu(c)).unsqueeze(1).chunk(6 if self.adaln_ffn else 3, dim=-1)  # each (B, 1, d)
        x = x + mod[2] * self.attn(modulate(self.norm1(x), mod[0], mod[1]))     # x_s
        x = x + self.cross_attn(self.norm2(x), text, text_mask)                  # x' (eq. 4)
        if self.adaln_ffn:
            return x + mod[5] * self.ffn(modulate(self.norm3(x), mod[3], mod[4]))
        return x + self.ffn(self.norm3(x))

    def init_weights(self) -> None:
        self.attn.init_weights()
        self.cross_attn.init_weights()
        self.ffn.init_weights()
        for norm in (self.norm2, self.norm3):
            if norm.weight is not None:
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.zeros_(self.adaln.weight)   # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.adaln.bias)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)   # (B, 1, d) each
        return self.linear(modulate(self.norm(x), shift, scale))            # (B, S, out)

    def init_weights(self) -> None:
        for lin in (self.adaln, self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


class ECDiT(nn.Module):
    """Predicts the rectified-flow velocity of latent tokens given t and text."""

    def __init__(self, mcfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.config = mcfg
        self.moe_config = moe
        d, p, C = mcfg.hidden_dim, mcfg.patch_size, mcfg.in_channels
        self.patch_embed = nn.Linear(p * p * C, d)
        self.register_buffer("pos_embed", torch.empty(mcfg.tokens_per_image, d), persistent=False)
        self.t_embed = TimestepEmbedder(d)
        self.text_null = nn.Parameter(torch.empty(mcfg.text_dim))
        self.blocks = nn.ModuleList(ECDiTBlock(mcfg, moe, i) for i in range(mcfg.num_layers))
        self.final = FinalLayer(d, p * p * C)
        if self.text_null.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; call after `to_empty()` on a meta model."""
        mcfg = self.config
        self.pos_embed.copy_(sincos_2d(mcfg.hidden_dim, mcfg.latent_size // mcfg.patch_size))
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.text_null, std=1.0)
        self.t_embed.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final.init_weights()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                keep: torch.Tensor | None = None, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, H, W) noisy latents; t (B,); text (B, L, text_dim); text_mask (B, L) bool;
        keep (B, S_keep) token indices to process (masked training) or None for all;
        drop_text (B,) bool: use the learned null text (classifier-free guidance).
        Returns the predicted velocity per processed token, (B, S_keep or S, p*p*C)."""
        p = self.config.patch_size
        h = self.patch_embed(patchify(x_t, p)) + self.pos_embed.to(x_t.dtype)   # (B, S, d)
        if keep is not None:
            h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, S_keep, d)
        if drop_text is not None:
            text, text_mask = self.null_text(text, text_mask, drop_text)
        c = self.t_embed(t)                                                    # (B, d)
        text_bias = attention_bias(text_mask, compute_dtype(h))                # (B, 1, 1, L), once
        for block in self.blocks:
            h = block(h, c, text, text_bias)
        return self.final(h, c)                                                # (B, S', p*p*C)

    def null_text(self, text: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor):
        """Replace the text of samples with drop=True by one learned null token."""
        null = torch.zeros_like(text)
        null[:, 0] = self.text_null.to(text.dtype)
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = True
        text = torch.where(drop[:, None, None], null, text)
        text_mask = torch.where(drop[:, None], null_mask, text_mask)
        return text, text_mask

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                 drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """Full-image velocity (B, C, H, W), no token masking (sampling)."""
        out = self(x_t, t, text, text_mask, keep=None, drop_text=drop_text)
        return unpatchify(out, self.config.patch_size, self.config.in_channels)

    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if b.is_moe]
