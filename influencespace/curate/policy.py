"""Curation policies: cluster scores in, a per-sample keep / weight / reason manifest out.

The InfluenceSpace policy works on clusters, using the influence stage's estimates and their
confidence intervals (sign convention: influence > 0 means the cluster lowers validation loss).
Influence decides which clusters go and how far each may be thinned; row-level evidence decides
which rows leave first:

1. **Harmful** clusters (``ci_high < 0``: confidently raise the validation loss) are pruned, always.
2. Rows of the other clusters leave, until the budget ``keep_fraction × N`` is met, in tiers of
   evidence (:func:`select_rows`): image–text **mismatches** (cosine a Tukey outlier of the pool's,
   :func:`mismatch_outliers`), **near-duplicates** of a row that stays (SemDeDup score ≥
   ``duplicate_threshold`` — first-order influence is additive, so it cannot see redundancy), rows of
   **negligible** clusters (the CI contains 0), and last rows of **helpful** clusters
   (``ci_low > 0``). Within a tier the row of lowest value goes first: its own influence from the
   influence stage's row pass (+ fairness_weight × the worst-off group's), or its image–text cosine.
   No cluster is thinned below ``min_cluster_keep`` of its size — dropping whole clusters costs class
   and group coverage — unless the floors together exceed the budget; then whole clusters go,
   negligible before helpful, lowest per-example value first,

       score_c = influence_c / size_c + fairness_weight · influence_c^{g*} / size_c

   with g* the worst-off group (highest validation loss). The budget is an upper bound: pruning
   harmful clusters may keep less.
3. Kept clusters that are **helpful** and **under-represented** (smaller than the median kept
   cluster) are up-weighted by inverse-frequency, (median / size)^power, and further by
   (1 + fairness_weight) when they significantly help the worst-off group. Weights are then
   normalised to mean 1 over kept rows and bounded to [min_weight, max_weight] (alternating
   normalise / clip, which converges because the bounds bracket 1).

Comparison policies at the same budget: ``random``; ``dedup`` (SemDeDup-style: within each cluster,
rows most similar to a more prototypical-distant kept row are removed first); ``clipscore`` (keep the
highest image–text cosine). All return the same manifest columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

KEEP_COLUMNS = ["id", "cluster", "keep", "weight", "reason"]

# Reason codes (short on purpose: the manifest has one row per sample).
HARMFUL = "harmful"
NEGLIGIBLE = "negligible"  # a whole negligible cluster dropped (only when the thinning floors exceed the budget)
NEGLIGIBLE_THINNED = "negligible-thinned"
MISMATCH = "image-text-mismatch"
BUDGET = "budget"  # a whole helpful cluster dropped (same condition)
BUDGET_THINNED = "budget-thinned"
KEPT = "kept"
UPWEIGHTED = "kept-upweighted"
DUPLICATE = "near-duplicate"
LOW_SIMILARITY = "low-image-text-similarity"
RANDOM_DROP = "random-drop"


@dataclass(frozen=True)
class PolicyParams:
    keep_fraction: float
    min_weight: float = 0.25
    max_weight: float = 4.0
    fairness_weight: float = 1.0
    upweight_power: float = 0.5
    min_cluster_keep: float = 0.25
    duplicate_threshold: float | None = 0.95  # None: no near-duplicate step
    seed: int = 0


def budget_rows(n_rows: int, keep_fraction: float) -> int:
    return int(round(keep_fraction * n_rows))


def classify_clusters(scores: pd.DataFrame, params: PolicyParams, worst_group: str | None = None) -> pd.DataFrame:
    """Per cluster: ``score`` (per-example value), ``harmful``, ``helpful``, ``negligible`` and ``floor`` rows.

    ``scores`` has one row per cluster: ``cluster``, ``size``, ``influence``, ``ci_low``, ``ci_high``
    and optionally ``influence_group_<g>`` / ``ci_low_group_<g>`` columns.
    """
    df = scores.copy().reset_index(drop=True)
    size = df["size"].to_numpy(dtype=np.float64)
    safe_size = np.maximum(size, 1.0)
    score = df["influence"].to_numpy(dtype=np.float64) / safe_size
    group_col = f"influence_group_{worst_group}" if worst_group else None
    if group_col and group_col in df:
        score = score + params.fairness_weight * df[group_col].fillna(0.0).to_numpy(dtype=np.float64) / safe_size
    df["score"] = score
    df["harmful"] = df["ci_high"].to_numpy() < 0
    df["helpful"] = df["ci_low"].to_numpy() > 0
    df["negligible"] = ~df["harmful"] & ~df["helpful"]
    df["floor"] = np.where(df["harmful"], 0, np.ceil(params.min_cluster_keep * size)).astype(np.int64)
    return df


def select_rows(assignments: pd.DataFrame, clusters: pd.DataFrame, budget: int, seed: int,
                row_value: np.ndarray | None = None, duplicate: np.ndarray | None = None,
                mismatch: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, reason) per row of ``assignments``: harmful clusters out, then rows out in order of evidence.

    Rows of non-harmful clusters leave, until ``budget`` rows remain, in tiers: image–text mismatches
    (``mismatch``), near-duplicates (``duplicate``), rows of negligible clusters, rows of helpful
    clusters; within a tier the lowest ``row_value`` first (NaN lowest; ties by a seeded random order
    over sorted ids). No cluster goes below its ``floor`` on the way. This is the greedy "take the
    next row unless its cluster is at its floor", computed without a loop: a cluster gives up exactly
    its first ``size − floor`` rows in the global order, so those are the candidates, taken in order.
    If the floors alone exceed the budget, whole clusters go, negligible before helpful, lowest score
    first.
    """
    n = len(assignments)
    ids = assignments["id"].to_numpy()
    info = clusters.set_index("cluster")
    cluster = assignments["cluster"].to_numpy()
    harmful = info.loc[cluster, "harmful"].to_numpy(dtype=bool)
    helpful = info.loc[cluster, "helpful"].to_numpy(dtype=bool)
    keep = ~harmful
    reason = np.where(harmful, HARMFUL, "").astype(object)
    excess = int(keep.sum()) - budget
    if excess <= 0:
        return keep, reason

    value = np.zeros(n) if row_value is None else np.nan_to_num(np.asarray(row_value, dtype=np.float64), nan=-np.inf)
    flags = [np.zeros(n, dtype=bool) if f is None else np.asarray(f, dtype=bool) for f in (mismatch, duplicate)]
    tier = np.where(flags[0], 0, np.where(flags[1], 1, np.where(helpful, 3, 2)))
    tie_break = np.empty(n)
    tie_break[np.argsort(ids, kind="stable")] = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tie_break, value, tier))
    order = order[keep[order]]
    rank_in_cluster = pd.Series(cluster[order]).groupby(cluster[order]).cumcount().to_numpy()
    room = (info.loc[cluster[order], "size"].to_numpy() - info.loc[cluster[order], "floor"].to_numpy())
    out = order[rank_in_cluster < room][:excess]
    keep[out] = False
    tier_reason = np.array([MISMATCH, DUPLICATE, NEGLIGIBLE_THINNED, BUDGET_THINNED], dtype=object)
    reason[out] = tier_reason[tier[out]]
    excess -= len(out)

    # Floors above the budget: drop whole clusters, negligible (lowest score first) before helpful.
    for c in clusters.sort_values(["helpful", "score", "cluster"])["cluster"]:
        if excess <= 0:
            break
        rows = np.flatnonzero((cluster == c) & keep)
        if len(rows) == 0:
            continue
        rows = rows[np.lexsort((tie_break[rows], value[rows]))][:excess]
        keep[rows] = False
        reason[rows] = NEGLIGIBLE_THINNED if not info.loc[c, "helpful"] else BUDGET_THINNED
        if not keep[cluster == c].any():  # the whole cluster went: say so on every row of it
            reason[cluster == c] = NEGLIGIBLE if not info.loc[c, "helpful"] else BUDGET
        excess -= len(rows)
    return keep, reason


def cluster_weights(clusters: pd.DataFrame, keep_rows: np.ndarray, params: PolicyParams,
                    worst_group: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weight, up-weighted) per cluster: helpful, under-represented kept clusters get more (module doc)."""
    size = clusters["size"].to_numpy(dtype=np.float64)
    weight = np.ones(len(clusters))
    kept = keep_rows > 0
    rare = np.zeros(len(clusters), dtype=bool)
    if kept.any():
        median_size = float(np.median(size[kept]))
        rare = kept & clusters["helpful"].to_numpy() & (size < median_size)
        weight[rare] = (median_size / np.maximum(size[rare], 1.0)) ** params.upweight_power
        group_ci = f"ci_low_group_{worst_group}" if worst_group else None
        if group_ci and group_ci in clusters:
            helps_worst = rare & (clusters[group_ci].fillna(-np.inf).to_numpy() > 0)
            weight[helps_worst] *= 1.0 + params.fairness_weight
        weight = bounded_unit_mean(weight, keep_rows, params.min_weight, params.max_weight)
    weight[~kept] = 0.0
    return weight, rare


def bounded_unit_mean(weight: np.ndarray, counts: np.ndarray, low: float, high: float, iters: int = 100) -> np.ndarray:
    """Scale ``weight`` so the count-weighted mean is 1, clipped to [low, high] (needs low ≤ 1 ≤ high)."""
    w = weight.astype(np.float64).copy()
    mask = counts > 0
    if not mask.any():
        return w
    for _ in range(iters):
        w = np.clip(w / (np.sum(w[mask] * counts[mask]) / np.sum(counts[mask])), low, high)
        if abs(np.sum(w[mask] * counts[mask]) / np.sum(counts[mask]) - 1.0) < 1e-9:
            break
    return w


def influence_policy(assignments: pd.DataFrame, scores: pd.DataFrame, params: PolicyParams,
                     worst_group: str | None = None, row_value: np.ndarray | None = None,
                     duplicate_scores: np.ndarray | None = None,
                     mismatch: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The InfluenceSpace policy: (per-sample manifest, per-cluster decisions).

    Cluster sizes are counted from ``assignments``; a cluster the influence stage did not score is
    treated as negligible (its interval is (-inf, inf)). ``row_value`` (higher is better: a row's own
    influence, or its image–text cosine), ``duplicate_scores`` (see :func:`semdedup_scores`) and
    ``mismatch`` flags, all aligned with ``assignments``, order the rows that leave (:func:`select_rows`).
    """
    sizes = assignments.groupby("cluster").size()
    frame = pd.DataFrame({"cluster": sizes.index, "size": sizes.to_numpy()})
    frame = frame.merge(scores.drop(columns=["size"], errors="ignore"), on="cluster", how="left")
    frame = frame.fillna({"influence": 0.0, "ci_low": -np.inf, "ci_high": np.inf})
    clusters = classify_clusters(frame, params, worst_group)
    duplicate = None
    if duplicate_scores is not None and params.duplicate_threshold is not None:
        duplicate = np.asarray(duplicate_scores) >= params.duplicate_threshold
    budget = budget_rows(len(assignments), params.keep_fraction)
    keep, reason = select_rows(assignments, clusters, budget, params.seed, row_value, duplicate, mismatch)

    cluster = assignments["cluster"].to_numpy()
    kept_per_cluster = pd.Series(keep).groupby(cluster).sum().reindex(clusters["cluster"], fill_value=0).to_numpy()
    weight, rare = cluster_weights(clusters, kept_per_cluster.astype(np.int64), params, worst_group)
    clusters["keep_rows"] = kept_per_cluster
    clusters["weight"] = weight
    clusters["kept_reason"] = np.where(rare, UPWEIGHTED, KEPT)
    dropped = pd.Series(reason[~keep]).groupby(cluster[~keep]).agg(lambda r: r.value_counts().index[0])
    clusters["dropped_reason"] = dropped.reindex(clusters["cluster"]).fillna("").to_numpy()
    by_cluster = clusters.set_index("cluster")
    row_weight = by_cluster.loc[cluster, "weight"].to_numpy()
    manifest = pd.DataFrame({
        "id": assignments["id"].to_numpy(),
        "cluster": cluster,
        "keep": keep,
        "weight": np.where(keep, row_weight, 0.0),
        "reason": np.where(keep, by_cluster.loc[cluster, "kept_reason"].to_numpy(), reason),
    })
    decisions = clusters[["cluster", "size", "score", "keep_rows", "weight", "kept_reason", "dropped_reason"]]
    return manifest[KEEP_COLUMNS], decisions


def mismatch_outliers(image_text_cosine: np.ndarray, iqr_multiple: float) -> np.ndarray:
    """Tukey's outlier rule on the image–text cosine: cosine < Q1 − k·IQR flags an image–text mismatch.

    The threshold comes from the pool's own distribution (no absolute cosine is assumed, so it
    adapts to the embedder); NaN cosines are flagged too.
    """
    cos = np.asarray(image_text_cosine, dtype=np.float64)
    finite = cos[np.isfinite(cos)]
    if len(finite) == 0:
        return np.ones(len(cos), dtype=bool)
    q1, q3 = np.percentile(finite, [25, 75])
    return ~(cos >= q1 - iqr_multiple * (q3 - q1))


# --------------------------------------------------------------------------------------------------
# Comparison policies at the same budget


def _top_k_manifest(assignments: pd.DataFrame, rank_value: np.ndarray, budget: int, drop_reason: str) -> pd.DataFrame:
    """Keep the ``budget`` rows with the highest ``rank_value`` (ties broken by id)."""
    ids = assignments["id"].to_numpy()
    order = np.lexsort((ids, -rank_value))
    keep = np.zeros(len(ids), dtype=bool)
    keep[order[:budget]] = True
    return pd.DataFrame({
        "id": ids, "cluster": assignments["cluster"].to_numpy(), "keep": keep,
        "weight": keep.astype(np.float64), "reason": np.where(keep, KEPT, drop_reason),
    })


def random_policy(assignments: pd.DataFrame, keep_fraction: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Rank by a seeded random value attached to sorted ids, so the result ignores input order.
    ids = assignments["id"].to_numpy()
    value = np.empty(len(ids))
    value[np.argsort(ids, kind="stable")] = rng.random(len(ids))
    return _top_k_manifest(assignments, value, budget_rows(len(ids), keep_fraction), RANDOM_DROP)


def clipscore_policy(assignments: pd.DataFrame, image_text_cosine: np.ndarray, keep_fraction: float) -> pd.DataFrame:
    return _top_k_manifest(assignments, np.asarray(image_text_cosine, dtype=np.float64),
                           budget_rows(len(assignments), keep_fraction), LOW_SIMILARITY)


def semdedup_scores(embeddings: np.ndarray, distances_to_centroid: np.ndarray) -> np.ndarray:
    """SemDeDup duplicate score of each row of one cluster.

    Rows are ordered by distance to the centroid, farthest first (SemDeDup keeps the least
    prototypical member of a duplicate group). A row's score is its highest cosine similarity to any
    row before it in that order: removing rows by descending score removes the most redundant first.
    """
    n = len(embeddings)
    if n <= 1:
        return np.zeros(n)
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-np.asarray(distances_to_centroid), kind="stable")
    xs = x[order]
    sims = xs @ xs.T
    sims[np.triu_indices(n)] = -np.inf  # only earlier rows count
    ordered_scores = sims.max(axis=1)
    ordered_scores[0] = -1.0
    scores = np.empty(n)
    scores[order] = ordered_scores
    return scores


def dedup_policy(assignments: pd.DataFrame, duplicate_scores: np.ndarray, keep_fraction: float) -> pd.DataFrame:
    """Remove the most duplicated rows (highest SemDeDup score) until the budget is met."""
    return _top_k_manifest(assignments, -np.asarray(duplicate_scores, dtype=np.float64),
                           budget_rows(len(assignments), keep_fraction), DUPLICATE)
