"""Which dataset sample fills which global batch slot.

The stream of global batch positions 0, 1, 2, ... runs through epochs; epoch e visits
every sample exactly once in the order of a permutation keyed by (seed, e). Step s
takes positions [s * B, (s + 1) * B) and data-parallel rank r takes its contiguous
slice of them, so the samples of a step never depend on the number of ranks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class EpochPermutation:
    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_samples)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> dataset indices."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.num_samples
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[positions[sel] % self.num_samples]
        return out


def rank_positions(step: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Global stream positions of the samples that data-parallel rank `dp_rank` trains on at `step`."""
    per_rank = global_batch // dp_size
    start = step * global_batch + dp_rank * per_rank
    return np.arange(start, start + per_rank, dtype=np.int64)


class BlockShuffle:
    """An epoch permutation that keeps reads local, for datasets too big to permute in memory.

    Epoch e shuffles the blocks (Parquet row groups) with a permutation keyed by (seed, e),
    cuts the shuffled order into windows of `window` blocks, and shuffles the samples inside
    each window (keyed by (seed, e, window)). It is a bijection on the samples, so every
    sample is used exactly once per epoch, and a global batch touches about
    batch / block size blocks instead of one block per sample.

    Memory is O(blocks), never O(samples): at 1.2e9 samples in row groups of 256 (4.7M
    blocks) an epoch's layout is a few int64 arrays of 4.7M entries. A call is vectorised:
    a few searchsorted over its positions plus one permutation per window it touches. All
    positions and indices are int64.
    """

    def __init__(self, block_sizes, seed: int, window: int = 16) -> None:
        self.sizes = np.asarray(block_sizes, dtype=np.int64)
        if self.sizes.size == 0 or self.sizes.sum() == 0:
            raise ValueError("the dataset is empty")
        self.num_samples = int(self.sizes.sum())
        self.seed, self.window = seed, max(1, window)
        self.block_start = np.concatenate([[0], np.cumsum(self.sizes)])        # (blocks + 1,) int64
        self._epoch = lru_cache(maxsize=2)(self._epoch_layout)
        self._window_perm = lru_cache(maxsize=64)(self._window_permutation)

    def _epoch_layout(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch, 0xB10C]).permutation(self.sizes.size)
        starts = np.concatenate([[0], np.cumsum(self.sizes[order])])           # in shuffled order
        wstart = starts[:: self.window]                                         # sample offset of each window
        wend = np.append(wstart[1:], starts[-1])
        return order, starts, wstart, wend

    def _window_permutation(self, epoch: int, w: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, w, 0x3E11]).permutation(size)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> dataset indices (both int64)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs).tolist():                  # one, or two at an epoch boundary
            sel = epochs == epoch
            r = positions[sel] - epoch * self.num_samples         # offset in the epoch's shuffled stream
            order, starts, wstart, wend = self._epoch(epoch)
            w = np.searchsorted(wstart, r, side="right") - 1      # window of each position
            j = np.empty_like(r)
            for win in np.unique(w).tolist():                     # about batch / window samples of them
                at = w == win
                lo, hi = int(wstart[win]), int(wend[win])
                j[at] = lo + self._window_perm(epoch, win, hi - lo)[r[at] - lo]
            k = np.searchsorted(starts, j, side="right") - 1      # position in shuffled block order
            out[sel] = self.block_start[order[k]] + (j - starts[k])
        return out
