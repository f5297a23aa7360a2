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


def test_harmful_pruned_negligible_next_budget_honoured():
    manifest, decisions = policy.influence_policy(_assignments(), SCORES, PolicyParams(keep_fraction=0.4))
    assert len(manifest) == 105 and manifest["id"].is_unique
    assert manifest["keep"].sum() == policy.budget_rows(105, 0.4) == 42
    by_cluster = manifest.groupby("cluster")["keep"].sum().to_dict()
    assert by_cluster[0] == 0 and set(manifest.loc[manifest.cluster == 0, "reason"]) == {policy.HARMFUL}
    assert by_cluster[1] == 0 and by_cluster[2] == 0  # both negligible ones go before any helpful one
    assert set(manifest.loc[manifest.cluster == 2, "reason"]) == {policy.NEGLIGIBLE}
    assert by_cluster[3] == 20 and by_cluster[5] == 5
    assert by_cluster[4] == 17  # lowest-scoring helpful cluster is subsampled to hit the budget exactly
    assert set(manifest.loc[(manifest.cluster == 4) & ~manifest.keep, "reason"]) == {policy.BUDGET_SUBSAMPLED}


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
    manifest, decisions = policy.influence_policy(_assignments(), SCORES[SCORES.cluster != 1], PolicyParams(keep_fraction=0.4))
    assert manifest.loc[manifest.cluster == 1, "keep"].sum() == 0
    assert decisions.set_index("cluster").loc[1, "dropped_reason"] == policy.NEGLIGIBLE


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
