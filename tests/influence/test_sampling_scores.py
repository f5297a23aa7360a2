import numpy as np
import pytest

from influencespace.influence import InfluenceError, cluster_statistics, sample_clusters, shard_clusters
from influencespace.influence.sampling import allocate


def test_allocation_is_proportional_covers_every_stratum_and_respects_sizes():
    assert allocate(np.array([3, 2]), 10).tolist() == [3, 2]  # small cluster: everything
    alloc = allocate(np.array([90, 9, 1]), 10)
    assert alloc.sum() == 10 and (alloc >= 1).all() and alloc[0] == 8
    assert allocate(np.array([5, 5, 5]), 2).sum() == 2


def test_plan_weights_sum_to_cluster_sizes_and_is_order_independent():
    rng = np.random.default_rng(0)
    ids = np.array([f"r{i}" for i in range(500)])
    cluster = rng.integers(0, 7, 500)
    group = rng.integers(0, 3, 500)
    plan = sample_clusters(ids, cluster, group, m=12, seed=3, num_clusters=9)
    assert plan.sizes.tolist() == np.bincount(cluster, minlength=9).tolist()
    totals = np.bincount(plan.cluster, weights=plan.weight, minlength=9)
    assert np.allclose(totals, plan.sizes)
    assert plan.sizes[7:].sum() == 0 and len(plan.clusters) == 9  # empty clusters are kept
    perm = rng.permutation(500)
    again = sample_clusters(ids[perm], cluster[perm], group[perm], m=12, seed=3, num_clusters=9)
    assert sorted(ids[plan.rows]) == sorted(ids[perm][again.rows])
    other = sample_clusters(ids, cluster, group, m=12, seed=4, num_clusters=9)
    assert sorted(ids[plan.rows]) != sorted(ids[other.rows])


def test_shards_do_not_split_clusters_and_cover_everything():
    plan = sample_clusters(np.arange(300).astype(str), np.arange(300) % 11, None, m=5, seed=0)
    parts = shard_clusters(plan, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(plan.rows)))
    owners = [set(plan.cluster[p].tolist()) for p in parts]
    assert not (owners[0] & owners[1]) and not (owners[1] & owners[2])


def test_negative_cluster_ids_are_rejected():
    with pytest.raises(InfluenceError, match="negative cluster"):
        sample_clusters(np.array(["a"]), np.array([-1]), None, m=2, seed=0)


def stats(cluster, stratum, size, finite, terms, sizes, n=100, groups=()):
    return cluster_statistics(
        np.asarray(cluster), np.asarray(stratum), np.asarray(size), np.asarray(finite, bool),
        np.asarray(terms, float).reshape(len(cluster), -1), np.asarray(sizes), n, 0.95, list(groups),
    )


def test_full_cluster_has_zero_stderr_and_the_exact_total():
    out = stats([0, 0, 0], [-1, -1, -1], [3, 3, 3], [1, 1, 1], [1.0, 2.0, 3.0], [3])
    assert out["influence"][0] == pytest.approx(6 / 100)
    assert out["stderr"][0] == 0 and out["ci_low"][0] == out["ci_high"][0] == out["influence"][0]


def test_sampled_cluster_uses_the_finite_population_correction():
    terms = np.array([1.0, 2.0, 4.0, 5.0])
    out = stats([0] * 4, [-1] * 4, [10] * 4, [1] * 4, terms, [10])
    assert out["influence"][0] == pytest.approx(10 * terms.mean() / 100)
    var = 10**2 * (1 - 4 / 10) * terms.var(ddof=1) / 4
    assert out["stderr"][0] == pytest.approx(np.sqrt(var) / 100)
    assert out["ci_low"][0] < out["influence"][0] < out["ci_high"][0]


def test_stratified_total_weights_each_group_by_its_size():
    # stratum 0: 90 members, draws 1.0 and 3.0; stratum 1: 10 members, draw 10.0
    out = stats([0, 0, 0], [0, 0, 1], [90, 90, 10], [1, 1, 1], [1.0, 3.0, 10.0], [100], n=1000)
    assert out["influence"][0] == pytest.approx((90 * 2.0 + 10 * 10.0) / 1000)


def test_non_finite_examples_are_reported_not_propagated():
    out = stats([0, 0, 0, 1, 1], [-1] * 5, [3, 3, 3, 2, 2], [1, 0, 1, 0, 0], [1.0, 0.0, 3.0, 0.0, 0.0], [3, 2])
    assert out["n_sampled"].tolist() == [2, 0] and out["n_dropped"].tolist() == [1, 2]
    assert out["influence"][0] == pytest.approx(3 * 2.0 / 100)
    assert out["influence"][1] == 0 and np.isinf(out["stderr"][1])
    assert np.isfinite(out["influence"]).all()


def test_group_columns_use_their_own_terms():
    terms = np.array([[1.0, 2.0, -1.0], [3.0, 4.0, -3.0]])
    out = stats([0, 0], [-1, -1], [2, 2], [1, 1], terms, [2], groups=("b lack", "white"))
    assert out["influence_group_b_lack"][0] == pytest.approx(6 / 100)
    assert out["influence_group_white"][0] == pytest.approx(-4 / 100)


def test_group_intervals_are_the_overall_estimator_on_that_groups_terms():
    """A group's stderr and interval are exactly what the overall columns give when that group's terms
    stand in column 0 (stratified, with finite-population correction and a non-finite row)."""
    rng = np.random.default_rng(3)
    cluster = np.array([0] * 6 + [1] * 4)
    stratum = np.array([0, 0, 0, 1, 1, 1, -1, -1, -1, -1])
    stratum_size = np.array([20, 20, 20, 8, 8, 8, 30, 30, 30, 30])
    finite = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    terms = rng.normal(size=(10, 3)) * np.array([1.0, 5.0, 0.1])  # groups with very different spreads
    out = stats(cluster, stratum, stratum_size, finite, terms, [28, 30], groups=("minority", "majority"))
    for j, group in ((1, "minority"), (2, "majority")):
        alone = stats(cluster, stratum, stratum_size, finite, terms[:, [j]], [28, 30])
        for stat in ("influence", "stderr", "ci_low", "ci_high"):
            got, want = out[f"{stat}_group_{group}"], alone[stat]
            assert got == pytest.approx(want, rel=1e-12), f"{stat} of {group}: {got} vs {want}"
    assert (out["stderr_group_minority"] > 10 * out["stderr_group_majority"]).all()  # each its own noise


def test_calls_are_benjamini_hochberg_over_the_clusters_t_tests():
    """p is the interval's own two-sided t-test (p < 0.05 exactly when the 95% interval excludes 0), q is
    scipy's BH over all clusters; known totals (stderr 0) and unknown clusters (stderr inf) are exact."""
    from scipy.stats import false_discovery_control

    from influencespace.influence.scores import call_p_values

    rng = np.random.default_rng(5)
    cluster = np.repeat(np.arange(6), 5)
    terms = rng.normal(size=30) + np.repeat([3.0, 0.0, 0.0, -2.0, 0.1, 0.0], 5)
    out = stats(cluster, [-1] * 30, [50] * 30, [1] * 30, terms, [50] * 6)
    p, q = call_p_values(out["influence"], out["stderr"], out["df"])
    excludes_zero = (out["ci_low"] > 0) | (out["ci_high"] < 0)
    assert excludes_zero.any() and not excludes_zero.all(), "both kinds of cluster, or the check is empty"
    assert ((p < 0.05) == excludes_zero).all(), (p, out["ci_low"], out["ci_high"])
    assert q == pytest.approx(false_discovery_control(p, method="bh"))
    assert (q >= p).all()
    p2, _ = call_p_values(np.array([0.5, 0.0, 0.3]), np.array([0.0, 0.0, np.inf]), np.array([3.0, 3.0, 1.0]))
    assert p2.tolist() == [0.0, 1.0, 1.0]


def test_model_variance_joins_the_sampling_error():
    """Ensemble intervals: stderr² = sampling stderr² of the mean terms + s²_between / E, with the
    Welch–Satterthwaite df; a cluster sampled whole gets an interval as wide as its models disagree."""
    from scipy.stats import t as student

    from influencespace.influence.scores import with_model_variance

    rng = np.random.default_rng(7)
    cluster = np.repeat([0, 1], [4, 3])
    stratum, size, finite = [-1] * 7, [10] * 4 + [3] * 3, [1] * 7  # cluster 1 is sampled whole
    members = [rng.normal(size=(7, 2)) + e for e in range(3)]
    each = [stats(cluster, stratum, size, finite, t, [10, 3], groups=("g",)) for t in members]
    pooled = stats(cluster, stratum, size, finite, np.mean(members, axis=0), [10, 3], groups=("g",))
    assert pooled["influence"] == pytest.approx(np.mean([m["influence"] for m in each], axis=0))  # linear
    out = with_model_variance(pooled, each, 0.95, ["g"])
    for value, stderr, low in (("influence", "stderr", "ci_low"), ("influence_group_g", "stderr_group_g", "ci_low_group_g")):
        between = np.var([m[value] for m in each], axis=0, ddof=1) / 3
        within = pooled[stderr] ** 2
        assert out[stderr] == pytest.approx(np.sqrt(within + between))
        df = (within + between) ** 2 / (within**2 / pooled["df"] + between**2 / 2)
        assert out[value] - out[low] == pytest.approx(student.ppf(0.975, df) * out[stderr])
    assert pooled["stderr"][1] == 0 and out["stderr"][1] > 0 and out["df"][1] == pytest.approx(2)
    assert with_model_variance(pooled, each[:1], 0.95, ["g"]) is pooled
