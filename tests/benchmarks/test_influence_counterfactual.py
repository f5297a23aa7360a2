"""benchmarks/influence_counterfactual.py: its statistics against hand-computed values."""

import numpy as np
import pytest

from benchmarks import influence_counterfactual as cf


def test_spearman_is_scipys_with_ties():
    from scipy.stats import spearmanr

    x, y = np.array([1.0, 2.0, 2.0, 5.0, 3.0]), np.array([0.1, 0.4, 0.2, 0.9, 0.9])
    assert cf.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(cf.spearman(np.ones(4), np.arange(4.0)))  # a constant side: undefined, not 0


def test_a_perfect_predictor_has_rho_one_and_a_tight_interval():
    x = np.arange(20.0)
    assert cf.spearman(x, 3 * x + 1) == 1.0
    assert cf.bootstrap_spearman(x, 3 * x + 1, resamples=200) == (1.0, 1.0)


def test_the_noise_ceiling_is_one_without_noise_and_low_with_pure_noise():
    items = np.arange(12.0)[:, None]
    assert cf.split_half_ceiling(np.repeat(items, 4, axis=1))["ceiling"] == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=(40, 4))
    assert abs(cf.split_half_ceiling(noise)["ceiling"]) < 0.5
    assert cf.split_half_ceiling(noise)["splits"] == 6  # C(4, 2) splits of four seeds


def test_loco_spans_the_score_range_and_subsets_are_distinct_halves():
    clusters, influence = np.arange(10), np.array([5.0, -3, 2, 9, 0, 1, 7, -1, 4, 3])
    chosen = cf.loco_clusters(clusters, influence, 3)
    assert set(chosen) == {1, 2, 3}  # ranks 0, 4 and 9 of the scores: the lowest, the middle, the highest
    subsets = cf.draw_subsets(clusters, 20, seed=1)
    assert len({tuple(s) for s in subsets}) == 20 and all(len(s) == 5 for s in subsets)
    # Σ over the removed clusters: for S = {0..4} the rest is clusters 5..9
    assert cf.removed_sum([np.arange(5)], clusters, influence)[0] == pytest.approx(influence[5:].sum())
