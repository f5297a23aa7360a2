"""The weighted sampler: frequencies follow the weights, shards are deterministic and partition each batch."""

from __future__ import annotations

import numpy as np
import pytest

from influencespace.train.sampler import WeightedShardSampler, weighted_draws


def test_frequencies_match_weights_chi_square():
    from scipy.stats import chisquare

    weights = np.array([0.25, 0.5, 1.0, 1.0, 2.0, 4.0, 0.0, 1.25])
    draws = weighted_draws(weights, 200_000, seed=7, epoch=0)
    counts = np.bincount(draws, minlength=len(weights))
    assert counts[6] == 0  # weight 0: never sampled
    positive = weights > 0
    expected = weights[positive] / weights.sum() * len(draws)
    # Fixed seed, so this is deterministic; the threshold is the usual 1% level.
    assert chisquare(counts[positive], expected).pvalue > 0.01
    # Frequency ratios follow weight ratios (a weight-4 row is seen ~16× as often as a weight-0.25 row).
    np.testing.assert_allclose(counts[5] / counts[0], 16.0, rtol=0.1)


def test_sampler_shards_partition_global_batches_for_any_world_size():
    weights = np.random.default_rng(0).uniform(0.1, 3.0, 50)
    single = WeightedShardSampler(weights, steps_per_epoch=5, global_batch=12, seed=3)
    single.set_epoch(2)
    reference = np.stack(list(single))
    for world in (2, 3, 4):
        shards = []
        for rank in range(world):
            sampler = WeightedShardSampler(weights, 5, 12, rank=rank, world_size=world, seed=3)
            sampler.set_epoch(2)
            shards.append(np.stack(list(sampler)))
            assert len(sampler) == 5 and shards[-1].shape == (5, 12 // world)
        np.testing.assert_array_equal(np.concatenate(shards, axis=1), reference)


def test_sampler_is_seeded_and_epochs_differ():
    weights = np.ones(100)
    a = WeightedShardSampler(weights, 3, 16, seed=1)
    b = WeightedShardSampler(weights, 3, 16, seed=1)
    assert np.array_equal(a.global_indices(), b.global_indices())
    b.set_epoch(1)
    assert not np.array_equal(a.global_indices(), b.global_indices())
    c = WeightedShardSampler(weights, 3, 16, seed=2)
    assert not np.array_equal(a.global_indices(), c.global_indices())


@pytest.mark.parametrize(
    ("weights", "message"),
    [(np.array([]), "non-empty"), (np.array([1.0, -1.0]), "non-negative"), (np.zeros(3), "positive"),
     (np.array([1.0, np.nan]), "finite")],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_draws(weights, 10, 0, 0)


def test_batch_must_split_evenly_across_workers():
    with pytest.raises(ValueError, match="divisible"):
        WeightedShardSampler(np.ones(4), 1, 10, rank=0, world_size=3)
