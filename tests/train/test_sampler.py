"""Weighted epochs from a stream: visit counts follow the weights, and nothing depends on who holds a row."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from influencespace.train.sampler import (
    EpochBatches,
    epoch_scale,
    micro_batches,
    repeat_counts,
    weighted_samples,
    window_shuffle,
)


def _chunks(ids, weights, size):
    for start in range(0, len(ids), size):
        yield {"id": ids[start:start + size], "weight": weights[start:start + size],
               "image": np.arange(start, min(start + size, len(ids)), dtype=np.float32)[:, None],
               "text": np.zeros((min(size, len(ids) - start), 1), np.float32)}


IDS = np.array([f"row-{i:04d}" for i in range(8)], dtype=object)
WEIGHTS = np.array([0.25, 0.5, 1.0, 1.0, 2.0, 4.0, 0.0, 1.25])


def test_visit_counts_follow_the_weights_chi_square():
    from scipy.stats import chi2

    scale = epoch_scale(64, WEIGHTS.sum())
    epochs = 4000
    visits = sum(repeat_counts(IDS, WEIGHTS, scale, seed=7, epoch=e) for e in range(epochs))
    assert visits[6] == 0, visits  # weight 0: never seen
    # A row's visits over the epochs: epochs·⌊wλ⌋ plus a Binomial(epochs, frac(wλ)); the sum of the
    # squared standardised deviations is χ² with one degree of freedom per row.
    target = WEIGHTS * scale
    frac = target - np.floor(target)
    random = frac > 0
    z = (visits - target * epochs)[random] / np.sqrt(epochs * frac * (1 - frac))[random]
    np.testing.assert_array_equal(visits[~random], (target * epochs)[~random])
    # Fixed seed and ids, so this is deterministic; the threshold is the usual 1% level.
    pvalue = chi2.sf(float((z**2).sum()), int(random.sum()))
    assert pvalue > 0.01, (visits, target * epochs, z, pvalue)
    # A weight-4 row is seen 16× as often as a weight-0.25 row (each count is within 1 of its expectation).
    np.testing.assert_allclose(visits[5] / visits[0], 16.0, rtol=0.05)
    for epoch in range(20):
        counts = repeat_counts(IDS, WEIGHTS, scale, seed=7, epoch=epoch)
        assert np.all(np.abs(counts - WEIGHTS * scale) < 1), (counts, WEIGHTS * scale)


def test_counts_depend_on_the_id_seed_and_epoch_only():
    rng = np.random.default_rng(0)
    ids = np.array([f"id-{i}" for i in range(500)], dtype=object)
    weights = rng.uniform(0.1, 3.0, 500)
    scale = epoch_scale(600, weights.sum())
    order = rng.permutation(500)
    reference = repeat_counts(ids, weights, scale, 3, 2)
    np.testing.assert_array_equal(repeat_counts(ids[order], weights[order], scale, 3, 2), reference[order])
    assert not np.array_equal(repeat_counts(ids, weights, scale, 3, 1), reference)  # another epoch
    assert not np.array_equal(repeat_counts(ids, weights, scale, 4, 2), reference)  # another seed
    # An epoch holds S samples in expectation: here within 3 sd of Σ p(1 − p).
    total = [repeat_counts(ids, weights, scale, 3, e).sum() for e in range(200)]
    frac = weights * scale - np.floor(weights * scale)
    assert abs(np.mean(total) - 600) < 3 * np.sqrt((frac * (1 - frac)).sum() / 200), np.mean(total)


def test_the_samples_offered_are_the_same_for_any_split_of_the_stream():
    """Two workers' streams (any split of the rows) offer together exactly what one stream offers."""
    rng = np.random.default_rng(1)
    ids = np.array([f"id-{i}" for i in range(300)], dtype=object)
    weights = rng.uniform(0.0, 3.0, 300)
    scale = epoch_scale(320, weights.sum())

    def offered(index):
        samples = weighted_samples(_chunks(ids[index], weights[index], 17), scale, seed=5, epoch=1)
        return Counter(i for part in samples for i in part["id"])

    single = offered(np.arange(300))
    split = rng.permutation(300)
    assert offered(split[:130]) + offered(split[130:]) == single


def test_batches_do_not_depend_on_how_the_stream_is_chunked():
    ids = np.array([f"id-{i}" for i in range(200)], dtype=object)
    weights = np.random.default_rng(2).uniform(0.2, 2.5, 200)
    scale = epoch_scale(192, weights.sum())

    def batches(chunk):
        return [b["id"] for b in EpochBatches(_chunks(ids, weights, chunk), scale=scale, seed=1, epoch=0, rank=0,
                                              micro_batch=16, window=48)]

    reference = batches(200)
    for chunk in (1, 7, 64):
        got = batches(chunk)
        assert len(got) == len(reference) and all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
    assert all(len(b) == 16 for b in reference)
    # The window shuffle reorders within windows and loses nothing.
    samples = list(weighted_samples(_chunks(ids, weights, 30), scale, 1, 0))
    shuffled = list(window_shuffle(iter(samples), 48, 1, 0, 0))
    flat = np.concatenate([s["id"] for s in samples])
    mixed = np.concatenate([s["id"] for s in shuffled])
    assert sorted(flat) == sorted(mixed) and not np.array_equal(flat, mixed)
    assert all(set(mixed[i:i + 48]) == set(flat[i:i + 48]) for i in range(0, len(flat), 48))


def test_micro_batches_are_full_and_the_partial_tail_is_dropped():
    parts = [{"id": np.arange(n)} for n in (5, 0, 9, 3)]
    sizes = [len(b["id"]) for b in micro_batches(iter(parts), 4)]
    assert sizes == [4, 4, 4, 4], sizes  # 17 samples: four batches, one left over
    with pytest.raises(ValueError, match="at least 1"):
        list(micro_batches(iter(parts), 0))


@pytest.mark.parametrize(("weights", "scale", "message"), [
    (np.array([1.0, -1.0]), 1.0, "non-negative"), (np.array([1.0, np.nan]), 1.0, "finite"),
    (np.ones(2), 0.0, "positive"),
])
def test_bad_weights_are_refused(weights, scale, message):
    with pytest.raises(ValueError, match=message):
        repeat_counts(np.array(["a", "b"], dtype=object), weights, scale, 0, 0)
    with pytest.raises(ValueError, match="positive"):
        epoch_scale(10, 0.0)
