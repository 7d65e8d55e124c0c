"""The embedded data: sampling order, scenes, the toy VAE and the tiny text encoder."""

import random

import numpy as np
import torch

from ecdit_dist.data.sampler import BlockShuffle, EpochPermutation, rank_positions
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


def _block_shuffle_reference(sizes, seed, window, p):
    """One position, straight from the definition: shuffle blocks, cut windows, shuffle in the window."""
    n = int(sizes.sum())
    epoch, r = divmod(int(p), n)
    order = np.random.default_rng([seed, epoch, 0xB10C]).permutation(sizes.size)
    w_blocks = [order[i:i + window] for i in range(0, order.size, window)]
    off = 0
    for w, blocks in enumerate(w_blocks):
        size = int(sizes[blocks].sum())
        if r < off + size:
            j = int(np.random.default_rng([seed, epoch, w, 0x3E11]).permutation(size)[r - off])
            for b in blocks:
                if j < sizes[b]:
                    return int(sizes[:b].sum()) + j
                j -= int(sizes[b])
        off += size
    raise AssertionError("position outside the epoch")


def test_block_shuffle_matches_its_definition():
    seed = random.SystemRandom().randrange(2**31)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 9, size=23)
    sizes[3] = 0                                                # empty row groups are allowed
    order = BlockShuffle(sizes, seed, window=3)
    positions = rng.integers(0, 3 * order.num_samples, size=200)
    assert order(positions).tolist() == [_block_shuffle_reference(sizes, seed, 3, p) for p in positions]


def test_block_shuffle_at_paper_scale_is_exactly_once_in_bounded_memory():
    """1.2e9 samples in row groups of about 256 (4.7M blocks, as 300k shards x 16): no per-sample
    state, int64 throughout; exactly-once checked window by window on a sample of windows."""
    import tracemalloc

    seed = random.SystemRandom().randrange(2**31)
    rng = np.random.default_rng(seed)
    blocks = 4_700_000
    sizes = rng.integers(192, 321, size=blocks).astype(np.int64)                   # mean 256
    tracemalloc.start()
    order = BlockShuffle(sizes, seed, window=16)
    n = order.num_samples
    assert n > 1.2e9 and n > 2**30
    gb = 4096
    step = int(rng.integers(0, n // gb))
    ids = order(rank_positions(step, gb, 0, 1))                                   # builds the epoch layout
    layout_peak = tracemalloc.get_traced_memory()[1]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    before = order._window_perm.cache_info().misses
    for s in range(step, step + 4):                                               # steady state: epoch cached
        for r in range(4):
            ids = order(rank_positions(s, gb, r, 4))
            assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < n
    step_cost = tracemalloc.get_traced_memory()[1] - held
    misses = order._window_perm.cache_info().misses - before
    for s in (n // gb - 1, n // gb, n // gb + 1):                                  # across an epoch boundary
        assert order(rank_positions(s, gb, 0, 1)).max() < n
    two_epochs = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # memory: O(blocks) int64 arrays, never O(samples) (a permutation of the samples would be 9.6 GB)
    assert layout_peak < 8 * 8 * blocks, layout_peak
    assert two_epochs < 8 * 8 * blocks, two_epochs
    # a step: a few arrays of its batch plus the window permutations it touches, whatever the dataset size
    assert step_cost < 64 * gb * 8 + 2 * 16 * 320 * 8, step_cost
    assert misses <= 4 * 2 + 2, misses              # ~ gb / (16 x 256) + 1 windows per step
    # exactly once: the positions of a window map one-to-one onto the samples of its blocks
    epoch_order, starts, wstart, wend = order._epoch(0)
    assert np.array_equal(np.sort(epoch_order), np.arange(blocks))                 # windows partition the blocks
    windows = -(-blocks // 16)
    for w in [0, windows - 1, *rng.integers(0, windows, size=30).tolist()]:
        got = order(np.arange(wstart[w], wend[w], dtype=np.int64))
        mine = epoch_order[w * 16:(w + 1) * 16]
        want = np.concatenate([np.arange(order.block_start[b], order.block_start[b + 1]) for b in mine])
        assert np.array_equal(np.sort(got), np.sort(want)), w
    p = rng.integers(0, 2 * n, size=6)
    assert order(p).tolist() == [_block_shuffle_reference_fast(order, int(q)) for q in p]


def _block_shuffle_reference_fast(order, p):
    """The definition for one position, using only the epoch's block order (the reference above
    loops over blocks in Python, too slow for 4.7M blocks)."""
    n = order.num_samples
    epoch, r = divmod(p, n)
    perm = np.random.default_rng([order.seed, epoch, 0xB10C]).permutation(order.sizes.size)
    shuffled = np.concatenate([[0], np.cumsum(order.sizes[perm])])
    w = int(np.searchsorted(shuffled[::order.window], r, side="right") - 1)
    lo = int(shuffled[w * order.window])
    hi = int(shuffled[min((w + 1) * order.window, perm.size)])
    j = lo + int(np.random.default_rng([order.seed, epoch, w, 0x3E11]).permutation(hi - lo)[r - lo])
    k = int(np.searchsorted(shuffled, j, side="right") - 1)
    return int(order.block_start[perm[k]] + j - shuffled[k])
