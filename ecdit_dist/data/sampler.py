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
