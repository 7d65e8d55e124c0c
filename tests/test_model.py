"""The EC-DiT network: shapes, attention against float64 references, conditioning paths."""

import random

import torch
import torch.nn.functional as F

from ecdit_dist.config import config_from_dict
from ecdit_dist.model import ECDiT, patchify, unpatchify
from ecdit_dist.model.attention import CrossAttention, SelfAttention
from ecdit_dist.model.moe import ExpertChoiceMoE, FeedForward, TokenChoiceMoE


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def tiny(**moe):
    cfg = config_from_dict({"model": {"preset": "tiny"}, "moe": moe}, validate=False)
    return cfg


def perturb(model):
    """Move zero-initialised weights (adaLN, output projections) so every path is live."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_patchify_roundtrip():
    fresh_seed()
    x = torch.randn(3, 8, 16, 16)
    tok = patchify(x, 2)
    assert tok.shape == (3, 64, 32)
    assert torch.equal(unpatchify(tok, 2, 8), x)
    # token 1 is the patch at row 0, columns 2..3
    assert torch.equal(tok[0, 1].view(2, 2, 8).permute(2, 0, 1), x[0, :, 0:2, 2:4])


def test_blocks_alternate_dense_and_moe():
    for router, cls in (("expert_choice", ExpertChoiceMoE), ("token_choice", TokenChoiceMoE)):
        cfg = tiny(router=router)
        model = ECDiT(cfg.model, cfg.moe)
        kinds = [type(b.ffn) for b in model.blocks]
        assert kinds == [FeedForward, cls, FeedForward, cls]
    cfg = tiny(num_experts=0)
    assert all(isinstance(b.ffn, FeedForward) for b in ECDiT(cfg.model, cfg.moe).blocks)


def test_forward_shapes_full_and_masked():
    fresh_seed()
    cfg = tiny()
    model = ECDiT(cfg.model, cfg.moe)
    B = 2
    x = torch.randn(B, 8, 16, 16)
    t = torch.rand(B)
    text = torch.randn(B, 16, 64)
    mask = torch.ones(B, 16, dtype=torch.bool)
    model.eval()
    out = model(x, t, text, mask)
    assert out.shape == (B, 64, 32)
    assert model.velocity(x, t, text, mask).shape == x.shape
    model.train()
    keep = torch.stack([torch.randperm(64)[:32].sort().values for _ in range(B)])
    assert model(x, t, text, mask, keep=keep).shape == (B, 32, 32)


def test_meta_construction_then_init_is_finite():
    fresh_seed()
    cfg = tiny()
    with torch.device("meta"):
        model = ECDiT(cfg.model, cfg.moe)
    model.to_empty(device="cpu")
    model.init_weights()
    perturb(model)
    model.eval()
    out = model(torch.randn(1, 8, 16, 16), torch.rand(1), torch.randn(1, 16, 64), torch.ones(1, 16, dtype=torch.bool))
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def reference_attention(q, k, v, mask=None):
    # q (B, H, L, hd), k/v (B, Hkv, M, hd): repeat kv heads, explicit softmax
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_gqa_self_attention_matches_float64_reference():
    seed = fresh_seed()
    d, H, Hkv = 48, 6, 2
    attn = SelfAttention(d, H, Hkv).double()
    x = torch.randn(2, 10, d, dtype=torch.float64)
    hd = d // H
    q = attn.q_proj(x).view(2, 10, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(2, 10, Hkv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(2, 10, Hkv, hd).transpose(1, 2)
    ref = attn.o_proj(reference_attention(q, k, v).transpose(1, 2).reshape(2, 10, d))
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    assert attn.k_proj.weight.shape == (Hkv * hd, d)


def test_cross_attention_ignores_padding_and_matches_reference():
    seed = fresh_seed()
    d, dy, H, Hkv = 32, 20, 4, 2
    attn = CrossAttention(d, dy, H, Hkv).double()
    perturb(attn)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    text = torch.randn(2, 5, dy, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, text, mask)
    hd = d // H
    q = attn.q_proj(x).view(2, 7, H, hd).transpose(1, 2)
    k = attn.k_proj(text).view(2, 5, Hkv, hd).transpose(1, 2)
    v = attn.v_proj(text).view(2, 5, Hkv, hd).transpose(1, 2)
    ref = attn.o_proj(reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, 7, d))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    text2 = text.clone()
    text2[0, 3:] = torch.randn(2, dy, dtype=torch.float64) * 100    # change only padded tokens
    torch.testing.assert_close(attn(x, text2, mask), out, rtol=0, atol=0)


def test_router_sees_self_attention_plus_cross_attention():
    """Paper eq. 4: the MoE input is (the norm of) x' = x_s + MHCA(x_s)."""
    fresh_seed()
    cfg = tiny()
    model = ECDiT(cfg.model, cfg.moe)
    perturb(model)
    block = model.blocks[1]
    seen = {}
    block.norm2.register_forward_hook(lambda m, i, o: seen.__setitem__("x_s", i[0]))
    block.cross_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("mhca", o))
    block.ffn.register_forward_pre_hook(lambda m, i: seen.__setitem__("moe_in", i[0]))
    model.eval()
    model(torch.randn(1, 8, 16, 16), torch.rand(1), torch.randn(1, 16, 64), torch.ones(1, 16, dtype=torch.bool))
    expected = block.norm3(seen["x_s"] + seen["mhca"])
    torch.testing.assert_close(seen["moe_in"], expected)


def test_dropped_text_ignores_the_caption():
    fresh_seed()
    cfg = tiny(num_experts=0)
    model = ECDiT(cfg.model, cfg.moe)
    perturb(model)
    model.eval()
    x, t = torch.randn(2, 8, 16, 16), torch.rand(2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    drop = torch.tensor([True, False])
    a = model(x, t, torch.randn(2, 16, 64), mask, drop_text=drop)
    b = model(x, t, torch.randn(2, 16, 64), mask, drop_text=drop)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)        # dropped: same null text
    assert not torch.allclose(a[1], b[1])                          # kept: depends on the text


def test_adaln_attn_ffn_modulates_the_moe_input():
    cfg = config_from_dict({"model": {"preset": "tiny", "adaln": "attn_ffn"}}, validate=False)
    model = ECDiT(cfg.model, cfg.moe)
    assert model.blocks[0].adaln.out_features == 6 * 128
    assert model.blocks[0].norm3.weight is None
    model.eval()
    out = model(torch.randn(1, 8, 16, 16), torch.rand(1), torch.randn(1, 16, 64), torch.ones(1, 16, dtype=torch.bool))
    assert out.shape == (1, 64, 32)


def test_bf16_autocast_routes_in_fp32():
    fresh_seed()
    moe = ExpertChoiceMoE(16, 32, 4, 2.0, 8)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.gating(x)
        out = moe(x)
    assert logits.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)).backward()
    assert moe.router.weight.grad is not None and torch.isfinite(moe.router.weight.grad).all()
