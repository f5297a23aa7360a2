"""A weighted, seeded sampler that shards every global batch across workers.

Each epoch draws ``steps × global_batch`` row indices with replacement, row i with probability
w_i / Σ w (so a row of weight 2 is seen twice as often as a row of weight 1, and weight 0 never).
The draw depends only on (seed, epoch), never on the number of workers: every worker makes the same
draw and takes its slice of each global batch, so the global batches are identical with 1 or N
workers and no indices need to be sent around. The baseline (every weight 1) goes through the same
sampler, so every variant is trained the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def weighted_draws(weights: np.ndarray, count: int, seed: int, epoch: int) -> np.ndarray:
    """``count`` row indices drawn with replacement, P(i) = w_i / Σ w; deterministic in (seed, epoch)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0:
        raise ValueError("weights must be a non-empty 1-D array")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    total = weights.sum()
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    rng = np.random.default_rng([seed, epoch])
    # Inverse-CDF sampling: exact, O(count log n), and identical on every worker.
    cdf = np.cumsum(weights / total)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(count), side="right").astype(np.int64)


class WeightedShardSampler:
    """Yields this worker's micro-batches of row indices for one epoch at a time.

    ``global_batch`` must be divisible by ``world_size``; worker ``rank`` gets rows
    ``[rank·m, (rank+1)·m)`` of every global batch, m = global_batch / world_size. Call
    :meth:`set_epoch` before iterating (as with torch's ``DistributedSampler``).
    """

    def __init__(self, weights: np.ndarray, steps_per_epoch: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be at least 1")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.micro_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_indices(self) -> np.ndarray:
        """The epoch's draw as (steps, global_batch): what every worker agrees on."""
        draws = weighted_draws(self.weights, self.steps_per_epoch * self.global_batch, self.seed, self.epoch)
        return draws.reshape(self.steps_per_epoch, self.global_batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        start = self.rank * self.micro_batch
        for batch in self.global_indices():
            yield batch[start : start + self.micro_batch]

    def __len__(self) -> int:
        return self.steps_per_epoch
