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


def test_harmful_pruned_then_negligible_clusters_thinned_evenly_before_helpful():
    manifest, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.6))
    assert len(manifest) == 105 and manifest["id"].is_unique
    assert manifest["keep"].sum() == policy.budget_rows(105, 0.6) == 63
    by_cluster = manifest.groupby("cluster")["keep"].sum().to_dict()
    assert by_cluster[0] == 0 and set(manifest.loc[manifest.cluster == 0, "reason"]) == {policy.HARMFUL}
    assert by_cluster[1] == by_cluster[2] == 9  # 22 rows over budget, taken evenly from the two negligible ones
    assert set(manifest.loc[(manifest.cluster == 2) & ~manifest.keep, "reason"]) == {policy.NEGLIGIBLE_THINNED}
    assert by_cluster[3] == by_cluster[4] == 20 and by_cluster[5] == 5  # helpful clusters untouched


def test_helpful_clusters_thinned_evenly_once_negligible_ones_reach_the_floor():
    manifest, _ = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.4, min_cluster_keep=0.25))
    assert manifest["keep"].sum() == 42
    by_cluster = manifest.groupby("cluster")["keep"].sum().to_dict()
    assert by_cluster[1] == by_cluster[2] == 5  # ceil(0.25 · 20): every cluster keeps its floor
    # 13 more rows come from the helpful clusters, the same share (≈ 29%) of each: 20 → 14, 20 → 14, 5 → 4.
    assert (by_cluster[3], by_cluster[4], by_cluster[5]) == (14, 14, 4)
    assert set(manifest.loc[(manifest.cluster == 4) & ~manifest.keep, "reason"]) == {policy.BUDGET_THINNED}


def test_whole_clusters_dropped_only_when_the_floors_exceed_the_budget():
    manifest, decisions = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.1, fairness_weight=0.0))
    by_cluster = manifest.groupby("cluster")["keep"].sum().to_dict()
    assert manifest["keep"].sum() == 10
    # Floors keep 5 + 5 + 5 + 5 + 2 = 22 > 10: negligible clusters go whole, lowest score first, then
    # the lowest-scoring helpful cluster gives up what is still over budget.
    assert by_cluster[1] == by_cluster[2] == 0
    assert (by_cluster[3], by_cluster[4], by_cluster[5]) == (5, 3, 2)
    assert decisions.set_index("cluster").loc[2, "dropped_reason"] == policy.NEGLIGIBLE


def test_thinned_cluster_drops_near_duplicates_then_lowest_image_text_cosine():
    assignments = _assignments()
    cosine = np.linspace(0.9, 0.1, len(assignments))  # later rows agree less
    duplicate_scores = np.zeros(len(assignments))
    in_cluster_1 = np.flatnonzero(assignments.cluster == 1)
    duplicate_scores[in_cluster_1[:3]] = 0.99  # the three best-agreeing rows of cluster 1 are near-copies
    manifest, _ = policy.influence_policy(assignments, SCORES, PolicyParams(keep_fraction=0.6),
                                          image_text_cosine=cosine, duplicate_scores=duplicate_scores)
    kept = manifest.set_index("id").loc[assignments["id"], "keep"].to_numpy()
    reasons = manifest.set_index("id").loc[assignments["id"], "reason"].to_numpy()
    assert not kept[in_cluster_1[:3]].any() and set(reasons[in_cluster_1[:3]]) == {policy.DUPLICATE}
    # 11 removed from cluster 1: the 3 copies, then the 8 rows with the lowest cosine (its last 8).
    assert kept[in_cluster_1[3:12]].all() and not kept[in_cluster_1[12:]].any()
    assert set(reasons[in_cluster_1[12:]]) == {policy.NEGLIGIBLE_THINNED}


@pytest.mark.parametrize("target", [0, 1, 7, 23, 40, 1000])
def test_thin_evenly_exact_total_equal_shares_floors_respected(target):
    keep = np.array([40, 20, 10, 7, 30])
    floor = np.array([10, 5, 3, 2, 8])
    selected = np.array([True, True, True, True, False])
    removed = policy.thin_evenly(keep, floor, selected, target)
    room = np.where(selected, keep - floor, 0)
    assert removed.sum() == min(target, room.sum())
    assert (removed <= room).all() and removed[~selected].sum() == 0
    unconstrained = selected & (removed < room)  # clusters not at their floor lose the same share, ±1 row
    shares = removed[unconstrained] / keep[unconstrained]
    if len(shares) > 1 and target > 0:
        assert shares.max() - shares.min() <= 1.0 / keep[unconstrained].min() + 1e-12


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
    assert manifest.loc[manifest.cluster == 1, "keep"].sum() == 9  # thinned like the other negligible cluster
    assert decisions.set_index("cluster").loc[1, "dropped_reason"] == policy.NEGLIGIBLE_THINNED


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
