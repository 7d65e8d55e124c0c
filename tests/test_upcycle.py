"""`ecdit convert upcycle --noise s`: each expert is the dense FFN plus its own noise of std s x std(dense)."""

import json
import random
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from ecdit_dist.checkpoint import convert as C
from ecdit_dist.config import config_from_dict
from ecdit_dist.model import ECDiT


def dense_checkpoint(folder, seed):
    """A consolidated dense model (safetensors + config.json) with random, non-trivial weights."""
    cfg = config_from_dict({"model": {"preset": "tiny-dense"}, "moe": {"num_experts": 0}}, validate=False)
    torch.manual_seed(seed)
    model = ECDiT(cfg.model, cfg.moe)
    state = {k: (torch.randn_like(v) * 0.05 + 0.01 if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    full = cfg.to_dict()
    (folder / "config.json").write_text(json.dumps({"model": full["model"], "moe": full["moe"]}))
    return state


def upcycle(src, out, noise, seed, experts=8):
    cmd = [sys.executable, "-m", "ecdit_dist.cli", "convert", "upcycle", "--src", str(src), "--out", str(out),
           "--experts", str(experts), "--noise", str(noise), "--seed", str(seed), "--max-shard-size", "0", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_file(str(out / "model.safetensors"))


def test_upcycle_noise_is_independent_per_expert_scaled_and_seeded(tmp_path):
    seed = random.SystemRandom().randrange(2**31)
    dense = dense_checkpoint(tmp_path / "dense", seed)
    s, experts = 0.1, 8
    a = upcycle(tmp_path / "dense", tmp_path / "a", s, seed, experts)
    C.upcycle(tmp_path / "dense", tmp_path / "b", experts, noise=s, seed=seed, max_shard_size="0")
    C.upcycle(tmp_path / "dense", tmp_path / "c", experts, noise=s, seed=seed + 1, max_shard_size="0")
    b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "bc")
    names = [n for n in a if n.endswith((".ffn.experts.w1", ".ffn.experts.w2"))]
    assert names and len(names) == 2 * sum(1 for n in a if n.endswith(".ffn.router.weight"))
    for name in names:
        src = dense[name.replace(".ffn.experts.", ".ffn.").replace("w1", "w1.weight").replace("w2", "w2.weight")]
        ref = src.t().double()                                     # (d, d_ff) or (d_ff, d), as every expert starts
        w = a[name].double()                                       # (E, ., .)
        assert w.shape == (experts, *ref.shape)
        noise = w - ref                                            # (E, ., .)
        want = s * ref.std().item()
        for e in range(experts):                                   # each expert: dense + noise of std s x std(dense)
            assert abs(noise[e].mean().item()) < 5 * want / noise[e].numel() ** 0.5
            assert abs(noise[e].std().item() / want - 1) < 0.05, (name, e, noise[e].std().item(), want)
        flat = noise.reshape(experts, -1)
        corr = torch.corrcoef(flat)                                # experts' noises are independent draws
        off = corr[~torch.eye(experts, dtype=torch.bool)]
        assert off.abs().max() < 0.2, (name, off.abs().max())
        assert len({tuple(flat[e, :4].tolist()) for e in range(experts)}) == experts
        assert torch.equal(a[name], b[name])                      # same seed: the same weights
        assert not torch.equal(a[name], c[name])                  # another seed: other noise
        assert abs((c[name].double() - ref).std().item() / want - 1) < 0.05
    for name in a:                                                 # everything else: the dense weights or the router
        if name not in names and not name.endswith(".ffn.router.weight"):
            assert torch.equal(a[name], dense[name]), name
