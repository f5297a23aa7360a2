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


def _bench(influence: np.ndarray) -> "cf.Bench":
    clusters = np.arange(len(influence))
    sizes = 3 + clusters % 5  # not all equal, so the size predictor is defined
    cluster = np.repeat(clusters, sizes)
    n = len(cluster)
    rng = np.random.default_rng(3)
    return cf.Bench(ids=np.array([f"r{i}" for i in range(n)], dtype=object), shard=np.zeros(n, int),
                    image=np.zeros((n, 2)), text=np.zeros((n, 2)), cosine=rng.uniform(size=n), cluster=cluster,
                    val_image=np.zeros((1, 2)), val_text=np.zeros((1, 2)), clusters=clusters,
                    influence=np.asarray(influence, float), size=sizes)


def test_rescoring_reuses_the_retrainings_and_gives_the_same_statistics_for_the_same_scores():
    """--reuse: another predictor against the same measured changes (paired), without training again."""
    truth = np.linspace(-1.0, 1.0, 12)  # what each cluster's removal adds to the loss
    bench = _bench(truth)

    def train(keep, seed):  # loss = Σ over removed clusters of their effect, plus seed noise shared by every config
        removed = np.setdiff1d(bench.clusters, np.unique(bench.cluster[keep]))
        return float(truth[removed].sum() + 0.01 * seed)

    noisy = truth + np.random.default_rng(0).normal(scale=0.8, size=12)
    first = cf.run_benchmark(_bench(noisy), train, seeds=2, loco=6, subsets=8)
    again = cf.rescore(_bench(noisy), first)
    for measure in ("loco", "lds"):
        assert again[measure]["correlations"] == first[measure]["correlations"], measure
        assert again[measure]["actual"] == first[measure]["actual"]
    exact = cf.rescore(_bench(truth), first)  # the true effects predict the same retrainings perfectly
    assert exact["lds"]["correlations"]["influence"]["spearman"] == pytest.approx(1.0)
    assert exact["loco"]["correlations"]["influence"]["spearman"] == pytest.approx(1.0)
    assert first["lds"]["correlations"]["influence"]["spearman"] < 0.999, first["lds"]["correlations"]["influence"]
