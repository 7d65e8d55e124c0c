"""The embedded data: sampling order, scenes, the toy VAE and the tiny text encoder."""

import random

import numpy as np
import torch

from ecdit_dist.data.sampler import EpochPermutation, rank_positions
from ecdit_dist.data.shapes import COLOURS, POSITIONS, ShapesSource, ToyVAE, render, scene
from ecdit_dist.data.text import TinyTextEncoder


def test_every_sample_once_per_epoch_for_any_rank_count():
    seed = random.SystemRandom().randrange(2**31)
    n, gb = 96, 12
    perm = EpochPermutation(n, seed)
    for dp in (1, 2, 3, 4):
        seen = []
        for step in range(n // gb):
            for r in range(dp):
                seen.append(perm(rank_positions(step, gb, r, dp)))
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == list(range(n)), (dp, seed)
        assert np.array_equal(seen, perm(np.arange(n)))        # same order whatever the layout
    assert not np.array_equal(perm(np.arange(n)), perm(np.arange(n, 2 * n)))  # reshuffled next epoch


def test_captions_describe_the_rendered_scene():
    src = ShapesSource(64, 32, seed=random.SystemRandom().randrange(2**31))
    for i in range(20):
        s, rng = scene(src.seed, i)
        img = render(s, rng, 32)
        assert s.caption.startswith({1: "one", 2: "two", 3: "three"}[s.count])
        assert s.colour in s.caption and s.position in s.caption
        cy, cx = (np.array(POSITIONS[s.position]) * 32).astype(int)
        window = img[:, max(cy - 7, 0):cy + 7, max(cx - 7, 0):cx + 7]
        colour = np.array(COLOURS[s.colour])[:, None, None]
        assert (np.abs(window - colour).sum(0) < 0.05).any(), s.caption   # the shape is where the caption says


def test_toy_vae_roundtrip():
    src = ShapesSource(128, 32, seed=random.SystemRandom().randrange(2**31))
    imgs, _ = src.images(range(32))
    z = src.vae.encode(imgs)
    assert z.shape == (32, 8, 16, 16)
    assert abs(z.mean().item()) < 0.1 and 0.7 < z.std().item() < 1.3     # normalised latents
    rec = src.vae.decode(z)
    psnr = 10 * torch.log10(4 / (rec - imgs).pow(2).mean())
    assert psnr > 28, psnr
    basis = ToyVAE().basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(8), rtol=0, atol=1e-6)  # orthonormal rows


def test_tiny_text_encoder_is_deterministic_and_masks_padding():
    enc = TinyTextEncoder(32, 10)
    emb, mask = enc.encode(["two red circles at the top left", "one zebra"])
    assert emb.shape == (2, 10, 32) and mask.tolist()[0] == [True] * 7 + [False] * 3
    ids, _ = enc.tokenize(["one zebra"])
    assert ids[0, 1].item() == 1  # unknown word
    assert torch.equal(emb[1, 2:], torch.zeros(8, 32))
    emb2, _ = TinyTextEncoder(32, 10).encode(["two red circles at the top left"])
    assert torch.equal(emb2[0], emb[0])
    a, _ = enc.encode(["red circle"])
    b, _ = enc.encode(["blue circle"])
    assert not torch.equal(a[0, 0], b[0, 0]) and torch.equal(a[0, 1], b[0, 1])
