"""Curation policies: cluster scores in, a per-sample keep / weight / reason manifest out.

The InfluenceSpace policy works on clusters, using the influence stage's estimates and their
confidence intervals (sign convention: influence > 0 means the cluster lowers validation loss).
Influence decides *how many* rows of each cluster stay; row-level quality decides *which*:

1. **Harmful** clusters (``ci_high < 0``: confidently raise the validation loss) are pruned, always.
2. The data budget ``keep_fraction × N`` is met by **thinning**, not by dropping whole clusters (a
   dropped cluster takes a slice of the distribution with it, which costs class and group coverage):
   first every **negligible** cluster (its CI contains 0) is thinned to one common keep fraction,
   as far down as ``min_cluster_keep`` of its size; if that is not enough, every **helpful** cluster
   (``ci_low > 0``) is thinned the same way. Only if the floors still exceed the budget are whole
   clusters dropped, lowest per-example value first (negligible before helpful), where

       score_c = influence_c / size_c + fairness_weight · influence_c^{g*} / size_c

   and g* is the worst-off group (highest validation loss). The budget is an upper bound: pruning
   harmful clusters may keep less.
3. Inside a thinned cluster, rows are removed in order of row-level priority (``row_priority``):
   near-duplicates of a row that stays (SemDeDup score ≥ ``duplicate_threshold``) first, then the
   lowest image–text agreement; ties, or no row signal at all, fall back to a seeded random order.
4. Kept clusters that are **helpful** and **under-represented** (smaller than the median kept
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
    duplicate_threshold: float = 0.95
    seed: int = 0


def budget_rows(n_rows: int, keep_fraction: float) -> int:
    return int(round(keep_fraction * n_rows))


def cluster_decisions(scores: pd.DataFrame, params: PolicyParams, worst_group: str | None = None) -> pd.DataFrame:
    """Per-cluster decision: ``keep_rows`` (how many rows stay), ``weight``, ``kept_reason``, ``dropped_reason``.

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
    harmful = df["ci_high"].to_numpy() < 0
    helpful = df["ci_low"].to_numpy() > 0
    negligible = ~harmful & ~helpful

    budget = budget_rows(int(size.sum()), params.keep_fraction)
    keep_rows = np.where(harmful, 0, size).astype(np.int64)
    dropped_reason = np.where(harmful, HARMFUL, "").astype(object)

    # Thin negligible clusters first, then helpful ones, each group to one common keep fraction.
    floor_rows = np.minimum(keep_rows, np.ceil(params.min_cluster_keep * size).astype(np.int64))
    excess = int(keep_rows.sum()) - budget
    for selected, reason in ((negligible, NEGLIGIBLE_THINNED), (helpful, BUDGET_THINNED)):
        if excess <= 0:
            break
        removed = thin_evenly(keep_rows, floor_rows, selected, excess)
        dropped_reason[removed > 0] = reason
        keep_rows -= removed
        excess -= int(removed.sum())

    # Floors still above the budget: drop whole clusters, negligible (lowest score first), then helpful.
    order = np.lexsort((df["cluster"].to_numpy(), score, ~negligible))
    for i in order:
        if excess <= 0:
            break
        if keep_rows[i] == 0:
            continue
        drop = min(int(keep_rows[i]), excess)
        keep_rows[i] -= drop
        excess -= drop
        if keep_rows[i] == 0:
            dropped_reason[i] = NEGLIGIBLE if negligible[i] else BUDGET

    # Up-weighting of helpful, under-represented kept clusters.
    weight = np.ones(len(df))
    kept = keep_rows > 0
    rare = np.zeros(len(df), dtype=bool)
    if kept.any():
        median_size = float(np.median(size[kept]))
        rare = kept & helpful & (size < median_size)
        weight[rare] = (median_size / safe_size[rare]) ** params.upweight_power
        group_ci = f"ci_low_group_{worst_group}" if worst_group else None
        if group_ci and group_ci in df:
            helps_worst = rare & (df[group_ci].fillna(-np.inf).to_numpy() > 0)
            weight[helps_worst] *= 1.0 + params.fairness_weight
        weight = bounded_unit_mean(weight, keep_rows, params.min_weight, params.max_weight)
    weight[~kept] = 0.0
    df["keep_rows"] = keep_rows
    df["weight"] = weight
    df["kept_reason"] = np.where(rare, UPWEIGHTED, KEPT)
    df["dropped_reason"] = dropped_reason
    return df[["cluster", "size", "score", "keep_rows", "weight", "kept_reason", "dropped_reason"]]


def thin_evenly(keep_rows: np.ndarray, floor_rows: np.ndarray, selected: np.ndarray, target: int) -> np.ndarray:
    """Rows to remove from each ``selected`` cluster so that together they give up ``target`` rows
    (or as many as their floors allow), every cluster losing the same share f of its rows:

        removed_c = min(keep_c − floor_c, f · keep_c),  f the smallest share with Σ removed_c ≥ target.

    f is found by bisection on the continuous problem; the integer parts are then topped up by the
    largest fractional remainders (ties by cluster position), so the total is exact and deterministic.
    """
    keep = np.where(selected, keep_rows, 0).astype(np.float64)
    room = np.where(selected, keep_rows - floor_rows, 0).astype(np.float64)
    target = int(min(target, room.sum()))
    if target <= 0:
        return np.zeros_like(keep_rows)
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if np.minimum(room, mid * keep).sum() >= target:
            high = mid
        else:
            low = mid
    share = np.minimum(room, high * keep)
    removed = np.floor(share).astype(np.int64)
    short = target - int(removed.sum())
    if short > 0:
        remainder = np.where(removed < room, share - removed, -1.0)
        for i in np.argsort(-remainder, kind="stable")[:short]:
            removed[i] += 1
    return removed


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


def apply_cluster_decisions(assignments: pd.DataFrame, decisions: pd.DataFrame, seed: int,
                            row_priority: np.ndarray | None = None, duplicate: np.ndarray | None = None) -> pd.DataFrame:
    """Per-sample manifest from per-cluster decisions.

    A thinned cluster keeps its ``keep_rows`` rows of highest ``row_priority`` (aligned with
    ``assignments``; ties and a missing priority fall back to a seeded random order over sorted ids,
    so the result does not depend on input row order). A removed row flagged in ``duplicate`` gets
    reason ``near-duplicate``; other removed rows get the cluster's reason.
    """
    rng = np.random.default_rng(seed)
    priority = np.zeros(len(assignments)) if row_priority is None else np.asarray(row_priority, dtype=np.float64)
    duplicate = np.zeros(len(assignments), dtype=bool) if duplicate is None else np.asarray(duplicate, dtype=bool)
    by_cluster = decisions.set_index("cluster")
    parts = []
    ids = assignments["id"].to_numpy()
    for cluster, position in sorted(assignments.groupby("cluster").indices.items()):
        decision = by_cluster.loc[cluster]
        n_keep = int(decision["keep_rows"])
        by_id = np.argsort(ids[position], kind="stable")
        tie_break = np.empty(len(position))
        tie_break[by_id] = rng.permutation(len(position))
        order = np.lexsort((tie_break, -priority[position]))  # best first
        keep = np.zeros(len(position), dtype=bool)
        keep[order[:n_keep]] = True
        dropped = np.where(duplicate[position], DUPLICATE, decision["dropped_reason"])
        parts.append(pd.DataFrame({
            "id": ids[position],
            "cluster": cluster,
            "keep": keep,
            "weight": np.where(keep, float(decision["weight"]), 0.0),
            "reason": np.where(keep, decision["kept_reason"], dropped),
        }))
    if not parts:
        return pd.DataFrame(columns=KEEP_COLUMNS)
    return pd.concat(parts, ignore_index=True)[KEEP_COLUMNS]


def row_priority(image_text_cosine: np.ndarray | None, duplicate_scores: np.ndarray | None,
                 duplicate_threshold: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(priority, is_duplicate) per row: near-duplicates of a row that stays rank below every other
    row; among the rest, higher image–text cosine ranks higher. ``None`` inputs mean "no signal"."""
    if image_text_cosine is None and duplicate_scores is None:
        return None, None
    n = len(image_text_cosine if image_text_cosine is not None else duplicate_scores)
    priority = np.zeros(n) if image_text_cosine is None else np.clip(np.nan_to_num(image_text_cosine, nan=-1.0), -1.0, 1.0)
    duplicate = None
    if duplicate_scores is not None:
        duplicate = np.asarray(duplicate_scores) >= duplicate_threshold
        priority = priority - 3.0 * duplicate  # cosine lies in [-1, 1]: any duplicate ranks last
    return priority, duplicate


def influence_policy(assignments: pd.DataFrame, scores: pd.DataFrame, params: PolicyParams,
                     worst_group: str | None = None, image_text_cosine: np.ndarray | None = None,
                     duplicate_scores: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The InfluenceSpace policy: (per-sample manifest, per-cluster decisions).

    Cluster sizes are counted from ``assignments``; a cluster the influence stage did not score is
    treated as negligible (its interval is (-inf, inf)). ``image_text_cosine`` and
    ``duplicate_scores`` (aligned with ``assignments``; see :func:`semdedup_scores`) choose which
    rows a thinned cluster keeps.
    """
    sizes = assignments.groupby("cluster").size()
    frame = pd.DataFrame({"cluster": sizes.index, "size": sizes.to_numpy()})
    frame = frame.merge(scores.drop(columns=["size"], errors="ignore"), on="cluster", how="left")
    frame = frame.fillna({"influence": 0.0, "ci_low": -np.inf, "ci_high": np.inf})
    decisions = cluster_decisions(frame, params, worst_group)
    priority, duplicate = row_priority(image_text_cosine, duplicate_scores, params.duplicate_threshold)
    return apply_cluster_decisions(assignments, decisions, params.seed, priority, duplicate), decisions


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
