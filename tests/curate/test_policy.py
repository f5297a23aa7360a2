import numpy as np
import pandas as pd
import pytest

from influencespace.curate import policy
from influencespace.curate.policy import PolicyParams

# Six clusters: 0 harmful, 1-2 negligible, 3-5 helpful (5 small and helpful: up-weighted).
SCORES = pd.DataFrame({
    "cluster": [0, 1, 2, 3, 4, 5],
    "size": [20, 20, 20, 20, 20, 5],
    "influence": [-5.0, 0.1, -0.2, 4.0, 2.0, 3.0],
    "ci_low": [-7.0, -1.0, -1.5, 2.0, 0.5, 1.0],
    "ci_high": [-3.0, 1.2, 1.1, 6.0, 3.5, 5.0],
    "influence_group_inverted": [0.0, 0.0, 0.0, 0.0, -1.0, 2.0],
    "ci_low_group_inverted": [0.0, 0.0, 0.0, 0.0, -2.0, 0.5],
})


def _assignments(shuffle_seed: int | None = None) -> pd.DataFrame:
    rows = [(f"id-{c}-{i:02d}", c) for c, n in zip(SCORES.cluster, SCORES["size"], strict=True) for i in range(n)]
    frame = pd.DataFrame(rows, columns=["id", "cluster"])
    frame["distance"] = np.linspace(0, 1, len(frame))
    if shuffle_seed is not None:
        frame = frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    return frame


def _kept_by_cluster(manifest):
    return manifest.groupby("cluster")["keep"].sum().to_dict()


def test_harmful_pruned_then_negligible_clusters_thinned_before_helpful():
    manifest, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.6))
    assert len(manifest) == 105 and manifest["id"].is_unique
    assert manifest["keep"].sum() == policy.budget_rows(105, 0.6) == 63
    kept = _kept_by_cluster(manifest)
    assert kept[0] == 0 and set(manifest.loc[manifest.cluster == 0, "reason"]) == {policy.HARMFUL}
    assert kept[1] + kept[2] == 18 and min(kept[1], kept[2]) >= 5  # 22 rows over budget, from the negligible ones
    assert set(manifest.loc[manifest.cluster.isin([1, 2]) & ~manifest.keep, "reason"]) == {policy.NEGLIGIBLE_THINNED}
    assert kept[3] == kept[4] == 20 and kept[5] == 5  # helpful clusters untouched


def test_helpful_clusters_thinned_once_negligible_ones_reach_their_floor():
    manifest, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.4, min_cluster_keep=0.25))
    assert manifest["keep"].sum() == 42
    kept = _kept_by_cluster(manifest)
    assert kept[1] == kept[2] == 5  # ceil(0.25 · 20): the floor
    assert kept[3] + kept[4] + kept[5] == 32 and kept[3] >= 5 and kept[4] >= 5 and kept[5] >= 2
    assert set(manifest.loc[manifest.cluster.isin([3, 4, 5]) & ~manifest.keep, "reason"]) == {policy.BUDGET_THINNED}


def test_whole_clusters_dropped_only_when_the_floors_exceed_the_budget():
    manifest, decisions = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.1, fairness_weight=0.0))
    kept = _kept_by_cluster(manifest)
    assert manifest["keep"].sum() == 10
    # Floors keep 5 + 5 + 5 + 5 + 2 = 22 > 10: negligible clusters go whole, lowest score first, then
    # the lowest-scoring helpful cluster gives up what is still over budget.
    assert kept[1] == kept[2] == 0
    assert (kept[3], kept[4], kept[5]) == (5, 3, 2)
    assert decisions.set_index("cluster").loc[2, "dropped_reason"] == policy.NEGLIGIBLE


def test_rows_leave_by_evidence_mismatch_then_duplicate_then_lowest_value():
    assignments = _assignments()
    value = np.linspace(0.9, 0.1, len(assignments))  # later rows are worth less
    in_1 = np.flatnonzero(assignments.cluster == 1)
    in_2 = np.flatnonzero(assignments.cluster == 2)
    mismatch = np.zeros(len(assignments), dtype=bool)
    mismatch[in_1[:3]] = True  # the three best-valued rows of cluster 1 are image–text mismatches
    duplicate_scores = np.zeros(len(assignments))
    duplicate_scores[in_1[3:6]] = 0.99  # and the next three near-copies
    manifest, _ = policy.influence_policy(assignments, SCORES, PolicyParams(keep_fraction=0.6), row_value=value,
                                          duplicate_scores=duplicate_scores, mismatch=mismatch)
    frame = manifest.set_index("id").loc[assignments["id"]]
    keep, reason = frame["keep"].to_numpy(), frame["reason"].to_numpy()
    assert set(reason[in_1[:3]]) == {policy.MISMATCH} and set(reason[in_1[3:6]]) == {policy.DUPLICATE}
    # 22 rows over budget: 3 mismatches, 3 duplicates, then 16 negligible rows of lowest value — cluster 2's
    # 15 lowest (down to its floor of 5), then cluster 1's lowest.
    assert not keep[in_2[5:]].any() and keep[in_2[:5]].all()
    assert not keep[in_1[-1]] and keep[in_1[6:-1]].all()
    assert set(reason[in_2[5:]]) == {policy.NEGLIGIBLE_THINNED}


@pytest.mark.parametrize("floor_protects_flagged", [False, True])
def test_a_cluster_of_mismatched_pairs_keeps_no_flagged_row_for_its_floor(floor_protects_flagged):
    """Cluster 1's 20 pairs: 18 flagged as image–text mismatches (a systematic caption swap influence did not
    call harmful). Its floor is ceil(0.25 · 20) = 5: by default it protects clean rows only, so the two clean
    pairs stay and all 18 mismatches go; with floor_protects_flagged the floor keeps 3 mismatched pairs."""
    assignments = _assignments()
    in_1 = np.flatnonzero(assignments.cluster == 1)
    mismatch = np.zeros(len(assignments), dtype=bool)
    mismatch[in_1[:18]] = True
    params = PolicyParams(keep_fraction=0.4, floor_protects_flagged=floor_protects_flagged)
    manifest, _ = policy.influence_policy(assignments, SCORES, params, mismatch=mismatch)
    frame = manifest.set_index("id").loc[assignments["id"]]
    keep, reason = frame["keep"].to_numpy(), frame["reason"].to_numpy()
    assert keep.sum() == policy.budget_rows(105, 0.4) == 42, keep.sum()
    kept_mismatches = int(keep[in_1[:18]].sum())
    assert keep[in_1[18:]].all(), reason[in_1[18:]]  # the clean pairs: inside the floor either way
    if floor_protects_flagged:
        assert kept_mismatches == 3, (kept_mismatches, reason[in_1])
    else:
        assert kept_mismatches == 0 and set(reason[in_1[:18]]) == {policy.MISMATCH}, (kept_mismatches, reason[in_1])


@pytest.mark.parametrize("floor_protects_flagged", [False, True])
def test_vectorised_selection_equals_the_row_by_row_greedy(floor_protects_flagged):
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 30, size=12)
    assignments = pd.DataFrame({"id": [f"r{i:04d}" for i in range(sizes.sum())], "cluster": np.repeat(np.arange(12), sizes)})
    clusters = pd.DataFrame({"cluster": np.arange(12), "size": sizes, "score": rng.normal(size=12),
                             "harmful": rng.random(12) < 0.2, "helpful": rng.random(12) < 0.5})
    clusters["helpful"] &= ~clusters["harmful"]
    clusters["floor"] = np.where(clusters["harmful"], 0, np.ceil(0.3 * sizes)).astype(int)
    n = len(assignments)
    # Some clusters mostly flagged, so that flagged rows reach below the floors (where the two rules differ).
    flag_rate = np.where(np.arange(12) % 3 == 0, 0.9, 0.15)[assignments["cluster"].to_numpy()]
    value, mismatch, dup = rng.normal(size=n), rng.random(n) < flag_rate / 2, rng.random(n) < flag_rate
    budget = int(0.4 * n)
    keep, _ = policy.select_rows(assignments, clusters, budget, 0, value, dup, mismatch, floor_protects_flagged)
    # Reference: walk the rows in the documented order, one at a time.
    info = clusters.set_index("cluster")
    cluster = assignments["cluster"].to_numpy()
    ref = ~info.loc[cluster, "harmful"].to_numpy()
    left = pd.Series(cluster[ref]).value_counts().to_dict()
    tier = np.where(mismatch, 0, np.where(dup, 1, np.where(info.loc[cluster, "helpful"], 3, 2)))
    tie = policy.tie_hash(assignments["id"].to_numpy(), 0)  # the seeded hash of the id (no equal hashes here)
    excess = ref.sum() - budget
    for i in np.lexsort((tie, value, tier)):
        if excess <= 0:
            break
        flagged_may_leave = tier[i] < 2 and not floor_protects_flagged
        if ref[i] and (flagged_may_leave or left[cluster[i]] > info.loc[cluster[i], "floor"]):
            ref[i], left[cluster[i]], excess = False, left[cluster[i]] - 1, excess - 1
    assert excess <= 0 and keep.sum() == budget
    np.testing.assert_array_equal(keep, ref)


def test_mismatch_outliers_use_tukeys_rule():
    cos = np.array([0.5, 0.55, 0.6, 0.65, 0.7, 0.05, np.nan])
    # Q1 = 0.55, Q3 = 0.65 over the finite values → threshold 0.55 − 1.5 · 0.1 = 0.4
    assert policy.mismatch_outliers(cos, 1.5).tolist() == [False] * 5 + [True, True]


def test_budget_is_an_upper_bound_when_harmful_clusters_exceed_it():
    manifest, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.95))
    assert manifest["keep"].sum() == 85  # everything but the harmful cluster, below the 100-row budget


def test_weights_bounded_mean_one_and_rare_helpful_upweighted():
    params = PolicyParams(keep_fraction=0.8, min_weight=0.5, max_weight=3.0)
    manifest, _ = policy.influence_policy(_assignments(), SCORES, params)
    kept = manifest[manifest.keep]
    assert kept["weight"].mean() == pytest.approx(1.0, abs=1e-9)
    assert kept["weight"].between(0.5, 3.0).all()
    assert (manifest.loc[~manifest.keep, "weight"] == 0).all()
    small = kept[kept.cluster == 5]
    assert (small["weight"] > kept[kept.cluster == 3]["weight"].iloc[0]).all()
    assert set(small["reason"]) == {policy.UPWEIGHTED}


def test_worst_group_influence_changes_ranking_and_weight():
    plain, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.8, fairness_weight=0.0),
                                       worst_group="inverted")
    fair, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.8, fairness_weight=1.0),
                                      worst_group="inverted")
    weight = lambda m: m.loc[m.cluster == 5, "weight"].iloc[0]  # noqa: E731
    assert weight(fair) > weight(plain)


def test_manifest_independent_of_input_row_order():
    a, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.5, seed=3))
    b, _ = policy.influence_policy(_assignments(shuffle_seed=7), SCORES, PolicyParams(keep_fraction=0.5, seed=3))
    key = lambda m: m.sort_values("id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(a), key(b))


def test_unscored_cluster_counts_as_negligible():
    manifest, decisions = policy.influence_policy(_assignments(), SCORES[SCORES.cluster != 1], PolicyParams(keep_fraction=0.6))
    kept = _kept_by_cluster(manifest)
    assert kept[1] + kept[2] == 18 and kept[3] == 20  # thinned like the other negligible cluster, before helpful ones
    assert decisions.set_index("cluster").loc[1, "dropped_reason"] == policy.NEGLIGIBLE_THINNED


def test_group_balance_gives_each_group_the_validation_share_of_the_kept_mass():
    """Unbounded: the validation groups hold exactly their target shares of the mass they share; a group the
    validation set lacks and rows without the attribute keep their cluster's weight (up to the common scale 1)."""
    cluster_weight = np.array([1.0, 2.0, 0.0])  # cluster 2 dropped
    kept = np.array([[30, 10, 5, 5],  # rows per (cluster, group): regular, minority, other, unknown
                     [20, 0, 0, 0],
                     [0, 0, 0, 0]])
    target = np.array([0.5, 0.5, 0.0, 0.0])
    cells = policy.group_balanced_weights(cluster_weight, kept, target, low=1e-6, high=1e6)
    mass = (cells * kept).sum(axis=0)
    scale = cells[0, 2]  # the common factor that brings the mean to 1 (the clusters' weights had mean 90 / 70)
    assert scale == pytest.approx(70 / 90)
    assert mass[0] == pytest.approx(mass[1])  # 50 / 50 between the validation's groups
    assert mass[:2].sum() == pytest.approx(scale * (cluster_weight @ kept)[:2].sum())  # their joint mass unchanged
    assert cells[0, 3] == pytest.approx(scale)  # the other group and the unknown keep their weight
    assert np.sum(cells * kept) / kept.sum() == pytest.approx(1.0)
    assert cells[1, 0] / cells[0, 0] == pytest.approx(2.0)  # the clusters' own weights stay in proportion


def test_group_balance_is_bounded_and_changes_weights_only():
    groups = np.where(np.arange(len(_assignments())) % 10 == 0, "minority", "regular").astype(object)
    groups[3] = None
    params = PolicyParams(keep_fraction=0.6, min_weight=0.25, max_weight=4.0)
    plain, plain_decisions = policy.influence_policy(_assignments(), SCORES, params)
    balanced, decisions = policy.influence_policy(_assignments(), SCORES, params, groups=groups,
                                                  group_target={"regular": 0.5, "minority": 0.5})
    pd.testing.assert_frame_equal(decisions, plain_decisions)  # the clusters' decisions and weights stay
    assert (balanced["keep"] == plain["keep"]).all() and (balanced["reason"] == plain["reason"]).all()
    kept = balanced[balanced.keep]
    assert kept["weight"].mean() == pytest.approx(1.0, abs=1e-9) and kept["weight"].between(0.25, 4.0).all()
    share = lambda m: m.loc[m.keep & (groups == "minority"), "weight"].sum() / m.loc[m.keep, "weight"].sum()  # noqa: E731
    assert share(plain) < 0.15 < share(balanced) < 0.5  # toward the target, held back by max_weight


@pytest.mark.parametrize("low,high", [(0.25, 4.0), (1.0, 1.0), (0.9, 1.1)])
def test_bounded_unit_mean(low, high):
    w = policy.bounded_unit_mean(np.array([0.1, 1.0, 10.0, 3.0]), np.array([5, 10, 1, 0]), low, high)
    counts = np.array([5, 10, 1])
    assert np.sum(w[:3] * counts) / counts.sum() == pytest.approx(1.0, abs=1e-6)
    assert ((w[:3] >= low - 1e-12) & (w[:3] <= high + 1e-12)).all()


def test_comparison_policies_hit_the_same_budget():
    assignments = _assignments()
    rng = np.random.default_rng(0)
    for manifest in (
        policy.random_policy(assignments, 0.5, seed=1),
        policy.clipscore_policy(assignments, rng.random(len(assignments)), 0.5),
        policy.dedup_policy(assignments, rng.random(len(assignments)), 0.5),
    ):
        assert manifest["keep"].sum() == 52 and manifest["id"].is_unique
        assert set(manifest.loc[manifest.keep, "weight"]) == {1.0}


def test_clipscore_keeps_highest_similarity():
    assignments = _assignments().iloc[:4].reset_index(drop=True)
    manifest = policy.clipscore_policy(assignments, np.array([0.1, 0.9, 0.5, 0.2]), 0.5)
    assert manifest["keep"].tolist() == [False, True, True, False]


def test_semdedup_removes_near_duplicates_first():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8))
    copies = base[0] + 0.001 * rng.normal(size=(3, 8))  # three near-copies of row 0
    embeddings = np.vstack([base, copies])
    distances = np.arange(9, dtype=float)[::-1]  # row 0 is the farthest from the centroid: kept first
    scores = policy.semdedup_scores(embeddings, distances)
    assert set(np.argsort(-scores)[:3]) == {6, 7, 8}
    assert scores[0] < 0.99


def test_semdedup_tile_by_tile_equals_one_tile():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(57, 5))
    embeddings[30:40] = embeddings[:10] + 1e-3 * rng.normal(size=(10, 5))
    distances = np.round(rng.random(57), 1)  # ties: ordered by id
    ids = np.array([f"r{i:03d}" for i in rng.permutation(57)], dtype=object)
    whole = policy.semdedup_scores(embeddings, distances, ids=ids, tile_elements=57 * 57)
    for tile_elements in (57, 57 * 4, 57 * 13):  # tiles of 1, 4 and 13 rows
        tiled = policy.semdedup_scores(embeddings, distances, ids=ids, tile_elements=tile_elements)
        # float32 dot products of unit vectors, summed in a different blocking: equal to a few ulps
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    shuffled = rng.permutation(57)
    again = policy.semdedup_scores(embeddings[shuffled], distances[shuffled], ids=ids[shuffled])
    np.testing.assert_allclose(again, whole[shuffled], rtol=0, atol=1e-6)  # independent of the order rows arrive in


def test_calls_follow_the_false_discovery_rate_when_q_values_are_there():
    """Harmful / helpful are BH calls (q ≤ fdr, by the sign of the influence); without q-values or with
    fdr None each cluster's own interval decides."""
    scores = pd.DataFrame({"cluster": [0, 1, 2, 3], "size": [10] * 4, "influence": [-1.0, -0.5, 0.4, 2.0],
                           "ci_low": [-2.0, -0.9, 0.1, 1.0], "ci_high": [-0.5, -0.1, 0.7, 3.0],
                           "q_value": [0.01, 0.2, 0.3, 0.04]})
    fdr = policy.classify_clusters(scores, PolicyParams(keep_fraction=0.5, fdr=0.05))
    assert fdr["harmful"].tolist() == [True, False, False, False]
    assert fdr["helpful"].tolist() == [False, False, False, True]
    intervals = policy.classify_clusters(scores, PolicyParams(keep_fraction=0.5, fdr=None))
    assert intervals["harmful"].tolist() == [True, True, False, False]
    assert intervals["helpful"].tolist() == [False, False, True, True]
    old = policy.classify_clusters(scores.drop(columns="q_value"), PolicyParams(keep_fraction=0.5))
    assert old[["harmful", "helpful"]].equals(intervals[["harmful", "helpful"]])


def test_validation_neighbours_are_the_brute_force_nearest_pool_row_of_the_same_cluster():
    rng = np.random.default_rng(5)
    rows, cluster = rng.normal(size=(300, 8)), rng.integers(0, 6, 300)
    cluster[cluster == 4] = 5  # cluster 4 has no pool row: its validation rows find nothing
    validation, validation_cluster = rng.normal(size=(40, 8)), rng.integers(0, 6, 40)
    got = policy.validation_neighbour_cosines(validation, validation_cluster, rows, cluster)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(validation) @ unit(rows).T
    want = np.array([sims[i, cluster == c].max() if (cluster == c).any() else -np.inf for i, c in enumerate(validation_cluster)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isneginf(got[validation_cluster == 4]).all() and (validation_cluster == 4).any()
    # over shards: the maximum of the shards' answers is the answer on the whole pool
    halves = [policy.validation_neighbour_cosines(validation, validation_cluster, rows[s], cluster[s])
              for s in (slice(0, 120), slice(120, None))]
    np.testing.assert_allclose(np.maximum(*halves), got, rtol=1e-6)


def test_fitted_thresholds_are_quantiles_of_the_trusted_set():
    cosines = np.array([0.1, 0.2, np.nan, 0.3, 0.4, 0.5])
    assert policy.validation_fence(cosines, 0.25) == pytest.approx(np.quantile([0.1, 0.2, 0.3, 0.4, 0.5], 0.25))
    neighbours = np.array([0.9, 0.95, -np.inf, 0.97, 0.99])
    assert policy.fitted_duplicate_threshold(neighbours, 0.25) == pytest.approx(np.quantile([0.9, 0.95, 0.97, 0.99], 0.75))
    with pytest.raises(ValueError, match="no validation row shares a cluster"):
        policy.fitted_duplicate_threshold(np.array([-np.inf]), 0.01)
    with pytest.raises(ValueError, match="no finite image–text cosine"):
        policy.validation_fence(np.array([np.nan]), 0.01)


def test_the_configs_ablation_names_are_the_policys():
    """curate.ablations is a Literal (so bad names fail at load, and the docs list them): it must name
    exactly policy.ABLATIONS, which holds what each changes."""
    from typing import get_args

    from influencespace.config import CurateConfig

    (names,) = get_args(CurateConfig.model_fields["ablations"].annotation)[:1]
    assert set(get_args(names)) == set(policy.ABLATIONS)
