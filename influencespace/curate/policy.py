"""Curation policies: cluster scores in, a per-sample keep / weight / reason manifest out.

The InfluenceSpace policy works on clusters, using the influence stage's estimates and their
confidence intervals (sign convention: influence > 0 means the cluster lowers validation loss).
Influence decides which clusters go and how far each may be thinned; row-level evidence decides
which rows leave first:

1. **Harmful** clusters (influence < 0 with Benjamini–Hochberg q ≤ ``fdr`` across the k clusters —
   or, with ``fdr`` None or scores without q-values, ``ci_high < 0``: confidently raise the validation
   loss) are pruned, always. **Helpful** is the same call with influence > 0 (or ``ci_low > 0``).
2. Rows of the other clusters leave, until the budget ``keep_fraction × N`` is met, in tiers of
   evidence (:func:`select_rows`): image–text **mismatches** (cosine below a fence fitted on the
   trusted validation set, :func:`validation_fence`, or Tukey's on the pool, :func:`mismatch_outliers`),
   **near-duplicates** of a row that stays (SemDeDup score ≥ a threshold fitted on the validation set,
   :func:`fitted_duplicate_threshold`, or a fixed one — first-order influence is additive, so it cannot
   see redundancy), rows of
   **negligible** clusters (not called either way), and last rows of **helpful** clusters. Within a
   tier the row of lowest value goes first: by default its own influence from the influence stage's
   row pass (+ fairness_weight × the worst-off group's: it keeps the rows the validation objective's
   worst-off group needs), or a seeded random value, or its image–text cosine (``row_order``).
   No cluster is thinned below ``min_cluster_keep`` of its size — dropping whole clusters costs class
   and group coverage — unless the floors together exceed the budget; then whole clusters go,
   negligible before helpful, lowest per-example value first,

       score_c = influence_c / size_c + fairness_weight · influence_c^{g*} / size_c

   with g* the worst-off group (highest validation loss). The floor protects a cluster's *clean*
   rows: a row the mismatch or near-duplicate tier flags may leave below it (unless
   ``floor_protects_flagged``), because a mismatched pair teaches the wrong caption for the cluster's
   images and a near-duplicate's source stays — keeping them covers nothing. (A cluster whose pairs
   are almost all mismatched, a systematic caption swap that influence did not call harmful, would
   otherwise keep a quarter of its wrong pairs.) The budget is an upper bound: pruning harmful
   clusters may keep less.
3. Kept clusters that are **helpful** and **under-represented** (smaller than the median kept
   cluster) are up-weighted by inverse-frequency, (median / size)^power, and further by
   (1 + fairness_weight) when they significantly help the worst-off group. Weights are then
   normalised to mean 1 over kept rows and bounded to [min_weight, max_weight] (alternating
   normalise / clip, which converges because the bounds bracket 1).
4. By default (``group_balance: validation``) the kept rows' weights are then balanced over the sensitive
   attribute toward the trusted validation set's group shares π_g — importance weights toward the target
   distribution the validation set stands for (:func:`group_balanced_weights`): with m_g the kept weight
   mass of group g, every row of g is scaled by r_g = π_g · M / m_g (M = Σ m_g over the groups the
   validation set has; a row of another group, or of none, keeps r = 1), then bounded as above. Pruning
   and thinning follow the data's own mix; only the kept rows' weights move.

Comparison policies at the same budget: ``random``; ``dedup`` (SemDeDup-style: within each cluster,
rows most similar to a more prototypical-distant kept row are removed first); ``clipscore`` (keep the
highest image–text cosine); ``clipscore_dedup`` (what a practitioner runs: near-duplicates out first,
then the lowest cosine). All return the same manifest columns.

**Ablations** (:data:`ABLATIONS`) are named settings of this same policy — not copies of it — curated
beside it at every budget (``curate.ablations``), so a benchmark can tell which signal does the work:
the same tiers with a random, a cosine or an own-influence order inside each; the heuristics without influence (no cluster is
called, so nothing is pruned or up-weighted); influence against a random validation direction (the
placebo); influence without the heuristic tiers. Each is also a plain configuration a user can run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from influencespace.curate.select import Key, lex_order, sortable
from influencespace.ids import id_hash
from influencespace.layout import group_column

KEEP_COLUMNS = ["id", "cluster", "keep", "weight", "reason"]

# Salts of the seeded id hashes (influencespace.ids): the tie-break, and the random policy's draw.
TIE_SALT = 0x7469
RANDOM_SALT = 0x726E

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
    fdr: float | None = 0.05  # BH level of the harmful / helpful calls; None: each cluster's own interval
    floor_protects_flagged: bool = False  # True: the floor keeps flagged rows too (mismatch / near-duplicate tiers)


# Each ablation: the curate settings it changes (curate.ablations; the rest of the configuration stays).
ABLATIONS: dict[str, dict[str, Any]] = {
    # The same tiers and floors, a seeded random order inside each tier (what the default own-influence order
    # adds; the default before benchmarks/outcome.py measured the own-influence order ahead on shape-captions).
    "tiers_random_order": {"row_order": "random"},
    # The same tiers and floors, the lowest image–text cosine first inside each tier (what the cosine as a
    # row signal adds; the default order before benchmarks/outcome.py measured the random one ahead).
    "tiers_cosine_order": {"row_order": "image_text"},
    # The same tiers and floors, the lowest own influence first inside each tier (what the row pass's influence,
    # worst-off group term included, adds as a row signal; a no-op under the default row_order: influence).
    "tiers_influence_order": {"row_order": "influence"},
    # No influence: no cluster is called harmful or helpful, so nothing is pruned or up-weighted;
    # the mismatch and near-duplicate tiers, the row order and the floors stay (what influence adds).
    "heuristics_only": {"influence_source": "none"},
    # Influence against a random validation direction of the real one's norm (what the validation
    # objective adds beyond the estimator's own noise and the clusters' sizes).
    "placebo": {"influence_source": "placebo"},
    # Influence alone: clusters called and thinned by influence, rows ordered by their own influence,
    # no mismatch or near-duplicate tier (what the heuristics add).
    "influence_only": {"row_order": "influence", "mismatch_fence": None, "duplicate_threshold": None},
    # The tiers' thresholds as fixed numbers — SemDeDup cosine 0.95 and Tukey's fence on the pool — instead of
    # fitted on the trusted validation set (what fitting them adds; the policy's settings before they were fitted).
    "fixed_thresholds": {"duplicate_threshold": 0.95, "mismatch_fence": "tukey"},
    # The floors protect every row, flagged ones included (what letting flagged rows leave below the floor adds;
    # the policy's behaviour before the floor protected only clean rows).
    "floors_protect_flagged": {"floor_protects_flagged": True},
    # The same selection, the kept rows' weights balanced over the sensitive attribute toward the validation set's
    # group shares (a no-op under the default group_balance: validation; what it adds when another is configured).
    "group_balanced": {"group_balance": "validation"},
    # The same selection, the clusters' weights only: no group balance (what matching the validation set's group mix
    # adds; the default before benchmarks/outcome.py measured the balance ahead on shape-captions).
    "unbalanced": {"group_balance": "none"},
}


def ablation_settings(name: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The curate settings ablation ``name`` changes, relative to the configured settings ``current``.

    Only the settings that differ from ``current`` are returned: empty when the ablation *is* the
    configured policy (say ``tiers_influence_order`` under the default ``row_order: influence``). Rows
    ordered by their own influence carry the validation objective too, so an ablation that removes it
    (``heuristics_only``, ``placebo``) orders rows at random instead: the heuristics as measured alone.
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
    settings = dict(ABLATIONS[name])
    if settings.get("influence_source", "validation") != "validation" and current.get("row_order") == "influence":
        settings["row_order"] = "random"
    return {key: value for key, value in settings.items() if current.get(key) != value}


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
    group_col = group_column(worst_group) if worst_group else None
    if group_col and group_col in df:
        score = score + params.fairness_weight * df[group_col].fillna(0.0).to_numpy(dtype=np.float64) / safe_size
    df["score"] = score
    if params.fdr is not None and "q_value" in df:
        # Called across all k clusters at false-discovery rate fdr (Benjamini–Hochberg q-values, written
        # by the influence stage); scores without them (an older run) fall back to the intervals.
        called = df["q_value"].fillna(1.0).to_numpy() <= params.fdr
        influence = df["influence"].to_numpy()
        df["harmful"], df["helpful"] = called & (influence < 0), called & (influence > 0)
    else:
        df["harmful"] = df["ci_high"].to_numpy() < 0
        df["helpful"] = df["ci_low"].to_numpy() > 0
    df["negligible"] = ~df["harmful"] & ~df["helpful"]
    df["floor"] = np.where(df["harmful"], 0, np.ceil(params.min_cluster_keep * size)).astype(np.int64)
    return df


def tie_hash(ids, seed: int) -> np.ndarray:
    """The seeded per-id tie-break (uint64): the same whatever the file order, shard count or worker count."""
    return id_hash(ids, seed, TIE_SALT)


def value_for_order(row_value: np.ndarray | None, n: int) -> np.ndarray:
    """Row values as the order uses them: float64, NaN as −inf (a row of unknown value leaves first)."""
    if row_value is None:
        return np.zeros(n)
    return np.nan_to_num(np.asarray(row_value, dtype=np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)


NEGLIGIBLE_TIER = 2  # tiers below it are the flagged rows (0 mismatch, 1 near-duplicate)


def row_tiers(helpful: np.ndarray, mismatch: np.ndarray | None = None, duplicate: np.ndarray | None = None) -> np.ndarray:
    """Evidence tier of each row: 0 image–text mismatch, 1 near-duplicate, 2 negligible cluster, 3 helpful cluster."""
    n = len(helpful)
    mismatch = np.zeros(n, dtype=bool) if mismatch is None else np.asarray(mismatch, dtype=bool)
    duplicate = np.zeros(n, dtype=bool) if duplicate is None else np.asarray(duplicate, dtype=bool)
    return np.where(mismatch, 0, np.where(duplicate, 1, np.where(helpful, 3, 2))).astype(np.int8)


def candidate_key(tier: np.ndarray, value: np.ndarray, hashes: np.ndarray) -> Key:
    """The order rows leave in: tier, then lowest value, then the seeded hash (then the id)."""
    return Key([np.asarray(tier).astype(np.uint64), sortable(value), np.asarray(hashes, dtype=np.uint64)], [16, 64, 64])


def order_cluster(ids: np.ndarray, hashes: np.ndarray, tier: np.ndarray, value: np.ndarray,
                  room: int, floor_protects_flagged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, fallback_rank) for the rows of one cluster.

    A cluster gives up at most ``room`` = size − floor rows on the way to the budget, and those are
    its first ``room`` rows in the leaving order (:func:`candidate_key`): the candidates. The floor
    protects clean rows only (unless ``floor_protects_flagged``): the f rows the mismatch and
    near-duplicate tiers flag come first in the order and may all leave, so the candidates are the
    first max(room, f) rows — all flagged ones and up to room − f clean ones, i.e. the cluster keeps
    min(floor, clean rows) of its clean rows. The rest (its floor) leave only if the floors together
    exceed the budget, lowest value first; ``fallback_rank`` is their rank in that order (−1 for
    candidates).
    """
    n = len(ids)
    order = lex_order(np.asarray(tier), sortable(value), np.asarray(hashes, dtype=np.uint64), ids=ids)
    if not floor_protects_flagged:
        room = max(room, int(np.count_nonzero(np.asarray(tier) < NEGLIGIBLE_TIER)))
    candidate = np.zeros(n, dtype=bool)
    candidate[order[:max(0, room)]] = True
    rest = np.flatnonzero(~candidate)
    fallback_rank = np.full(n, -1, dtype=np.int64)
    if len(rest):
        rest_order = lex_order(sortable(value[rest]), np.asarray(hashes, dtype=np.uint64)[rest], ids=np.asarray(ids)[rest])
        fallback_rank[rest[rest_order]] = np.arange(len(rest))
    return candidate, fallback_rank


def plan_fallback(clusters: pd.DataFrame, left: np.ndarray, excess: int) -> np.ndarray:
    """Rows each cluster gives up beyond its candidates when the floors exceed the budget (aligned with ``clusters``).

    ``left`` is each cluster's rows still kept after the candidates went; clusters give them up whole,
    negligible before helpful, lowest per-example score first (then by cluster id), until ``excess``
    rows are gone; the last cluster only in part.
    """
    take = np.zeros(len(clusters), dtype=np.int64)
    order = np.lexsort((clusters["cluster"].to_numpy(), clusters["score"].to_numpy(), clusters["helpful"].to_numpy()))
    for position in order:
        if excess <= 0:
            break
        take[position] = min(int(left[position]), excess)
        excess -= int(take[position])
    return take


REASON_ORDER = [HARMFUL, NEGLIGIBLE, BUDGET, MISMATCH, DUPLICATE, NEGLIGIBLE_THINNED, BUDGET_THINNED]
TIER_REASONS = np.array([MISMATCH, DUPLICATE, NEGLIGIBLE_THINNED, BUDGET_THINNED], dtype=object)


@dataclass
class Selection:
    """The budget cut, as per-cluster numbers (k rows): what the per-row pass needs to decide every row."""

    clusters: pd.DataFrame  # classify_clusters' frame, sorted by cluster
    cut_by_tier: np.ndarray  # (k, 4): candidates cut in each tier
    take: np.ndarray  # fallback rows given up beyond the candidates
    whole: np.ndarray  # the fallback took the cluster's last row

    @property
    def kept_rows(self) -> np.ndarray:
        size = self.clusters["size"].to_numpy(dtype=np.int64)
        kept = size - self.cut_by_tier.sum(axis=1) - self.take
        return np.where(self.clusters["harmful"].to_numpy(), 0, kept)


def finish_selection(clusters: pd.DataFrame, cut_by_tier: np.ndarray, excess_left: int) -> Selection:
    """From the candidates cut (per cluster and tier) and the excess still left: the fallback, as a :class:`Selection`."""
    size = clusters["size"].to_numpy(dtype=np.int64)
    harmful = clusters["harmful"].to_numpy()
    left = np.where(harmful, 0, size - cut_by_tier.sum(axis=1))
    take = plan_fallback(clusters, left, excess_left) if excess_left > 0 else np.zeros(len(clusters), dtype=np.int64)
    return Selection(clusters, cut_by_tier, take, (take > 0) & (take == left))


def decide_rows(selection: Selection, position: np.ndarray, tier: np.ndarray, cut: np.ndarray,
                fallback_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, drop reason) per row, from its cluster's ``position`` in ``selection.clusters`` and its own evidence.

    ``cut``: the row is a candidate inside the budget cut. The same function decides rows in memory
    (:func:`select_rows`) and shard by shard (the curate stage), so both give the same manifest.
    """
    info = selection.clusters
    harmful = info["harmful"].to_numpy()[position]
    helpful = info["helpful"].to_numpy()[position]
    fallback = (fallback_rank >= 0) & (fallback_rank < selection.take[position])
    keep = ~harmful & ~cut & ~fallback
    reason = np.full(len(position), "", dtype=object)
    reason[cut] = TIER_REASONS[np.asarray(tier, dtype=np.int64)[cut]]
    reason[fallback] = np.where(helpful[fallback], BUDGET_THINNED, NEGLIGIBLE_THINNED)
    whole = selection.whole[position]
    reason[whole] = np.where(helpful[whole], BUDGET, NEGLIGIBLE)  # the whole cluster went: say so on every row
    reason[harmful] = HARMFUL
    return keep, reason


def select_rows(assignments: pd.DataFrame, clusters: pd.DataFrame, budget: int, seed: int,
                row_value: np.ndarray | None = None, duplicate: np.ndarray | None = None,
                mismatch: np.ndarray | None = None, floor_protects_flagged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(keep, reason) per row of ``assignments``, in memory: the reference the curate stage's passes reproduce.

    Harmful clusters out; then rows of the other clusters leave, until ``budget`` rows remain, in tiers
    (:func:`row_tiers`); within a tier the lowest ``row_value`` first (NaN lowest), ties by a seeded
    hash of the id (:func:`tie_hash`), then the id. No cluster goes below its ``floor`` of clean rows on
    the way. This is the greedy "take the next row unless it is clean and its cluster is at its floor",
    computed without a loop: a cluster gives up exactly its first max(size − floor, flagged) rows in the
    global order (:func:`order_cluster`; ``size − floor`` with ``floor_protects_flagged``), so those are
    the candidates, taken in order. If the floors alone exceed the budget, whole clusters go
    (:func:`plan_fallback`).
    """
    selection, position, tier, cut, fallback_rank = _select_in_memory(assignments, clusters, budget, seed,
                                                                      row_value, duplicate, mismatch,
                                                                      floor_protects_flagged)
    return decide_rows(selection, position, tier, cut, fallback_rank)


def cluster_positions(clusters: pd.DataFrame, cluster: np.ndarray) -> np.ndarray:
    """Position of each row's cluster in ``clusters`` (sorted by cluster id); an unknown cluster is an error."""
    ids = clusters["cluster"].to_numpy()
    position = np.searchsorted(ids, cluster)
    position = np.minimum(position, len(ids) - 1)
    if len(cluster) and not np.array_equal(ids[position], cluster):
        raise ValueError("rows name a cluster missing from the cluster table")
    return position


def _select_in_memory(assignments, clusters, budget, seed, row_value, duplicate, mismatch, floor_protects_flagged):
    clusters = clusters.sort_values("cluster").reset_index(drop=True)
    ids = assignments["id"].to_numpy()
    n = len(ids)
    position = cluster_positions(clusters, assignments["cluster"].to_numpy())
    harmful = clusters["harmful"].to_numpy()[position]
    room = np.where(clusters["harmful"], 0, clusters["size"] - clusters["floor"]).astype(np.int64)
    tier = row_tiers(clusters["helpful"].to_numpy()[position], mismatch, duplicate)
    value = value_for_order(row_value, n)
    hashes = tie_hash(ids, seed)
    candidate = np.zeros(n, dtype=bool)
    fallback_rank = np.full(n, -1, dtype=np.int64)
    for pos, rows in pd.Series(np.arange(n)).groupby(position).indices.items():
        if not harmful[rows[0]]:
            candidate[rows], fallback_rank[rows] = order_cluster(ids[rows], hashes[rows], tier[rows], value[rows],
                                                                 room[pos], floor_protects_flagged)
    excess = int((~harmful).sum()) - budget
    cut = np.zeros(n, dtype=bool)
    if excess > 0:
        rows = np.flatnonzero(candidate)
        key = candidate_key(tier[rows], value[rows], hashes[rows])
        cut[rows[lex_order(*key.words, ids=ids[rows])[:excess]]] = True
    cut_by_tier = np.zeros((len(clusters), 4), dtype=np.int64)
    np.add.at(cut_by_tier, (position[cut], tier[cut].astype(np.int64)), 1)
    selection = finish_selection(clusters, cut_by_tier, excess - int(cut.sum()))
    return selection, position, tier, cut, fallback_rank


def cluster_weights(clusters: pd.DataFrame, keep_rows: np.ndarray, params: PolicyParams,
                    worst_group: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight, up-weighted, helps the worst group) per cluster: helpful, under-represented kept clusters
    get more, and (1 + fairness_weight) times more where the worst-off group's own interval says the
    cluster helps that group too (``ci_low_group_<g> > 0``, written by the influence stage; module doc)."""
    size = clusters["size"].to_numpy(dtype=np.float64)
    weight = np.ones(len(clusters))
    kept = keep_rows > 0
    rare = np.zeros(len(clusters), dtype=bool)
    helps_worst = np.zeros(len(clusters), dtype=bool)
    if kept.any():
        median_size = float(np.median(size[kept]))
        rare = kept & clusters["helpful"].to_numpy() & (size < median_size)
        weight[rare] = (median_size / np.maximum(size[rare], 1.0)) ** params.upweight_power
        group_ci = group_column(worst_group, "ci_low") if worst_group else None
        if group_ci and group_ci in clusters:
            helps_worst = rare & (clusters[group_ci].fillna(-np.inf).to_numpy() > 0)
            weight[helps_worst] *= 1.0 + params.fairness_weight
        weight = bounded_unit_mean(weight, keep_rows, params.min_weight, params.max_weight)
    weight[~kept] = 0.0
    return weight, rare, helps_worst


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


def cluster_table(sizes: pd.Series, scores: pd.DataFrame, params: PolicyParams,
                  worst_group: str | None = None) -> pd.DataFrame:
    """The k-row table every decision is made on: sizes (cluster → rows) joined with the influence scores.

    A cluster the influence stage did not score is treated as negligible (its interval is (-inf, inf)).
    Sorted by cluster, with ``room`` = size − floor (flagged rows may leave beyond it: :func:`order_cluster`).
    """
    frame = pd.DataFrame({"cluster": sizes.index.to_numpy(dtype=np.int64), "size": sizes.to_numpy(dtype=np.int64)})
    frame = frame.merge(scores.drop(columns=["size"], errors="ignore"), on="cluster", how="left")
    frame = frame.fillna({"influence": 0.0, "ci_low": -np.inf, "ci_high": np.inf})
    clusters = classify_clusters(frame, params, worst_group).sort_values("cluster").reset_index(drop=True)
    clusters["room"] = np.where(clusters["harmful"], 0, clusters["size"] - clusters["floor"]).astype(np.int64)
    return clusters


def decisions_of(selection: Selection, params: PolicyParams, worst_group: str | None = None) -> pd.DataFrame:
    """Per cluster: kept rows, weight, the reason kept rows carry and the commonest reason its dropped rows carry."""
    clusters = selection.clusters.copy()
    keep_rows = selection.kept_rows
    weight, rare, helps_worst = cluster_weights(clusters, keep_rows, params, worst_group)
    clusters["keep_rows"] = keep_rows
    clusters["weight"] = weight
    clusters["helps_worst_group"] = helps_worst
    clusters["kept_reason"] = np.where(rare, UPWEIGHTED, KEPT)
    helpful = clusters["helpful"].to_numpy()
    size = clusters["size"].to_numpy(dtype=np.int64)
    thinned = np.where(selection.whole, 0, selection.take)
    counts = np.zeros((len(clusters), len(REASON_ORDER)), dtype=np.int64)  # columns follow REASON_ORDER
    counts[:, 0] = np.where(clusters["harmful"], size, 0)
    counts[:, 1] = np.where(selection.whole & ~helpful, size, 0)
    counts[:, 2] = np.where(selection.whole & helpful, size, 0)
    partial = ~selection.whole
    counts[:, 3] = np.where(partial, selection.cut_by_tier[:, 0], 0)
    counts[:, 4] = np.where(partial, selection.cut_by_tier[:, 1], 0)
    counts[:, 5] = np.where(partial, selection.cut_by_tier[:, 2] + np.where(helpful, 0, thinned), 0)
    counts[:, 6] = np.where(partial, selection.cut_by_tier[:, 3] + np.where(helpful, thinned, 0), 0)
    clusters["dropped_reason"] = np.where(counts.max(axis=1) > 0, np.array(REASON_ORDER, dtype=object)[counts.argmax(axis=1)], "")
    return clusters[["cluster", "size", "score", "keep_rows", "weight", "helps_worst_group", "kept_reason", "dropped_reason"]]


def influence_policy(assignments: pd.DataFrame, scores: pd.DataFrame, params: PolicyParams,
                     worst_group: str | None = None, row_value: np.ndarray | None = None,
                     duplicate_scores: np.ndarray | None = None,
                     mismatch: np.ndarray | None = None, groups: np.ndarray | None = None,
                     group_target: Mapping[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The InfluenceSpace policy in memory: (per-sample manifest, per-cluster decisions).

    Cluster sizes are counted from ``assignments``; ``row_value`` (higher is better: a row's own
    influence, or its image–text cosine), ``duplicate_scores`` (see :func:`semdedup_scores`) and
    ``mismatch`` flags, all aligned with ``assignments``, order the rows that leave (:func:`select_rows`).
    With ``group_target`` (group → share in the validation set) the kept rows' weights are balanced over
    ``groups`` (each row's sensitive attribute, None where unknown; :func:`group_balanced_weights`); the
    decisions keep the clusters' own weights. The curate stage computes the same manifest shard by shard;
    this is its reference.
    """
    clusters = cluster_table(assignments.groupby("cluster").size(), scores, params, worst_group)
    duplicate = None
    if duplicate_scores is not None and params.duplicate_threshold is not None:
        duplicate = np.asarray(duplicate_scores) >= params.duplicate_threshold
    budget = budget_rows(len(assignments), params.keep_fraction)
    selection, position, tier, cut, fallback_rank = _select_in_memory(
        assignments, clusters, budget, params.seed, row_value, duplicate, mismatch, params.floor_protects_flagged)
    keep, reason = decide_rows(selection, position, tier, cut, fallback_rank)
    decisions = decisions_of(selection, params, worst_group)
    weight = None
    if group_target is not None:
        kept_groups = np.asarray(groups, dtype=object)[keep]
        names, cells, _ = balance_cells(decisions["weight"].to_numpy(), count_groups(position[keep], kept_groups),
                                        group_target, params.min_weight, params.max_weight)
        weight = np.zeros(len(keep))
        weight[keep] = cells[position[keep], group_codes(names, kept_groups)]
    manifest = manifest_rows(assignments["id"].to_numpy(), assignments["cluster"].to_numpy(), keep, reason,
                             decisions, position, weight)
    return manifest, decisions


def count_groups(position: np.ndarray, groups: np.ndarray) -> dict[tuple[int, Any], int]:
    """Kept rows per (cluster position, group), a missing group as None: at most k × G entries."""
    kept = pd.DataFrame({"position": position, "group": pd.Series(groups, dtype=object)})
    counts = kept.value_counts(dropna=False)
    names = known_groups(g for _, g in counts.index)
    return {(int(p), g): int(n) for ((p, _), n), g in zip(counts.items(), names, strict=True)}


def balance_cells(cluster_weight: np.ndarray, counts: Mapping[tuple[int, Any], int], target: Mapping[str, float],
                  low: float, high: float) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(group axis, (k, G) balanced cell weights, (k, G) kept counts) from the kept rows' :func:`count_groups`
    (summed over shards, in the curate stage) and the validation set's shares ``target``."""
    names = group_names(target, [g for _, g in counts])
    column = {g: i for i, g in enumerate(names)}
    kept = np.zeros((len(cluster_weight), len(names)), dtype=np.int64)
    for (position, group), n in counts.items():
        kept[position, column[group]] += n
    cells = group_balanced_weights(cluster_weight, kept, target_shares(names, target), low, high)
    return names, cells, kept


def known_groups(groups: Any) -> list[Any]:
    """Group values with a missing one (None, or NaN: what pandas makes of a null) as None (for a few values:
    the distinct groups, not every row)."""
    return [None if pd.isna(g) else g for g in groups]


def group_names(target: Mapping[str, float], *seen: Iterable[Any]) -> list[Any]:
    """The group axis of the balancing tables: the validation set's groups and any other the pool shows, sorted,
    with None (a row without the attribute) last when present."""
    names = set(target)
    for values in seen:
        names.update(values)
    return sorted((g for g in names if g is not None), key=str) + ([None] if None in names else [])


def group_codes(names: list[Any], groups: np.ndarray) -> np.ndarray:
    """Each row's index on the group axis ``names``; a missing group (None or NaN) is the axis' None."""
    groups = np.asarray(groups, dtype=object)
    codes = pd.Index([g for g in names if g is not None], dtype=object).get_indexer(groups)
    missing = pd.isna(groups)
    if missing.any():
        codes[missing] = names.index(None) if None in names else -1
    if (codes < 0).any():
        raise ValueError(f"group {groups[np.flatnonzero(codes < 0)[0]]!r} is not on the group axis {names}")
    return codes.astype(np.int64)


def target_shares(names: list[Any], target: Mapping[str, float]) -> np.ndarray:
    """π over the group axis: the validation set's share of each group, 0 for the others."""
    return np.array([float(target.get(g, 0.0)) if g is not None else 0.0 for g in names])


def group_balanced_weights(cluster_weight: np.ndarray, kept: np.ndarray, target: np.ndarray,
                           low: float, high: float) -> np.ndarray:
    """(k, G) weight of a kept row by its cluster c and group g: w_c · r_g, bounded to [low, high] with mean 1.

    ``kept[c, g]``: kept rows of cluster c in group g; ``target[g]`` the validation set's share π_g (0 for
    a group it lacks). With m_g = Σ_c w_c · kept[c, g] the kept weight mass of group g and B the groups
    with π_g > 0 and m_g > 0,

        r_g = π'_g · M / m_g,   M = Σ_{g∈B} m_g,   π'_g = π_g / Σ_{h∈B} π_h     (g ∈ B; r_g = 1 otherwise)

    so the groups of B hold the target's shares of their joint mass and the rest keeps its own. The cells
    are then bounded as the clusters' weights are (:func:`bounded_unit_mean`): the bound may leave a small
    group short of its share, never above ``high``.
    """
    mass = cluster_weight @ kept
    balanced = (np.asarray(target) > 0) & (mass > 0)
    factor = np.ones(kept.shape[1])
    if balanced.any():
        share = np.asarray(target)[balanced] / np.asarray(target)[balanced].sum()
        factor[balanced] = share * mass[balanced].sum() / mass[balanced]
    cells = np.outer(cluster_weight, factor)
    return bounded_unit_mean(cells.ravel(), kept.ravel(), low, high).reshape(cells.shape)


def manifest_rows(ids: np.ndarray, cluster: np.ndarray, keep: np.ndarray, reason: np.ndarray,
                  decisions: pd.DataFrame, position: np.ndarray, weight: np.ndarray | None = None) -> pd.DataFrame:
    """The manifest's rows: kept rows carry their cluster's weight (or ``weight``, per row: the group-balanced
    one) and kept reason, dropped rows weight 0."""
    row_weight = decisions["weight"].to_numpy()[position] if weight is None else weight
    return pd.DataFrame({
        "id": ids,
        "cluster": cluster,
        "keep": keep,
        "weight": np.where(keep, row_weight, 0.0),
        "reason": np.where(keep, decisions["kept_reason"].to_numpy()[position], reason),
    })[KEEP_COLUMNS]


def tukey_fence(order_statistic: Callable[[int], float], n_finite: int, iqr_multiple: float) -> float:
    """Q1 − k·IQR of the pool's image–text cosines, from their order statistics (0-based ranks).

    Quartiles interpolate linearly between the order statistics around rank q·(n − 1) (numpy's
    default ``percentile`` method). The fence comes from the pool's own distribution, so no absolute
    cosine is assumed and it adapts to the embedder. −inf when there are fewer than two values.
    """
    if n_finite == 0:
        return np.inf  # nothing finite: every row is flagged (NaN cosines are mismatches)

    def quartile(q: float) -> float:
        at = q * (n_finite - 1)
        low, high = int(np.floor(at)), int(np.ceil(at))
        a = order_statistic(low)
        b = order_statistic(high) if high != low else a
        return a + (b - a) * (at - low)

    q1, q3 = quartile(0.25), quartile(0.75)
    return q1 - iqr_multiple * (q3 - q1)


def validation_fence(validation_cosines: np.ndarray, rate: float) -> float:
    """The mismatch fence fitted on the trusted validation pairs: their ``rate``-quantile of image–text cosine.

    A pool row below it is flagged; ``rate`` is then the share of trusted (clean) pairs the rule would
    flag, whatever the embedder's cosine scale — a rate carries over to another embedding space, an
    absolute cosine or an IQR multiple of a contaminated pool does not. NaN cosines are left out.
    """
    cos = np.asarray(validation_cosines, dtype=np.float64)
    cos = cos[np.isfinite(cos)]
    if not len(cos):
        raise ValueError("the validation set has no finite image–text cosine to fit the mismatch fence on")
    return float(np.quantile(cos, rate))


def validation_neighbour_cosines(validation: np.ndarray, validation_cluster: np.ndarray, rows: np.ndarray,
                                 cluster: np.ndarray) -> np.ndarray:
    """Per validation row, its highest cosine to any of ``rows`` in the same cluster (−inf where it has none).

    The maximum over pool shards of these is each trusted row's nearest pool neighbour within its
    cluster: what a *distinct* sample reaches, the null distribution of the SemDeDup score
    (:func:`fitted_duplicate_threshold`). Work O(V·n/k·d) per shard, not O(V·n·d): only a validation
    row's own cluster is searched.
    """
    out = np.full(len(validation), -np.inf)
    if not len(rows) or not len(validation):
        return out
    v = np.asarray(validation, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    x = np.asarray(rows, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    order = np.argsort(cluster, kind="stable")
    sorted_cluster = np.asarray(cluster)[order]
    validation_cluster = np.asarray(validation_cluster)
    for c in np.unique(validation_cluster):
        lo, hi = np.searchsorted(sorted_cluster, c, "left"), np.searchsorted(sorted_cluster, c, "right")
        if hi > lo:
            mine = np.flatnonzero(validation_cluster == c)
            out[mine] = (v[mine] @ x[order[lo:hi]].T).max(axis=1)
    return out


def fitted_duplicate_threshold(neighbour_cosines: np.ndarray, rate: float) -> float:
    """The SemDeDup threshold fitted on the trusted validation set: the (1 − ``rate``) quantile of its rows'
    nearest-pool-neighbour cosines (:func:`validation_neighbour_cosines`).

    A validation row is a distinct sample, so at most ``rate`` of distinct pairs reach the threshold.
    The SemDeDup score compares a row with the rows *before* it in its cluster, the validation row
    with the whole cluster, so the null is if anything set high: the rule errs towards keeping rows.
    """
    found = np.asarray(neighbour_cosines, dtype=np.float64)
    found = found[np.isfinite(found)]
    if not len(found):
        raise ValueError("no validation row shares a cluster with a pool row: the duplicate threshold cannot be fitted")
    return float(np.quantile(found, 1.0 - rate))


def mismatch_outliers(image_text_cosine: np.ndarray, iqr_multiple: float) -> np.ndarray:
    """Tukey's outlier rule on the image–text cosine: cosine < Q1 − k·IQR flags an image–text mismatch (NaN too)."""
    cos = np.asarray(image_text_cosine, dtype=np.float64)
    finite = np.sort(cos[np.isfinite(cos)])
    fence = tukey_fence(lambda rank: float(finite[rank]), len(finite), iqr_multiple)
    return ~(cos >= fence)


# --------------------------------------------------------------------------------------------------
# Comparison policies at the same budget: each keeps the first ``budget`` rows in one key's order.

COMPARISON_REASONS = {"random": RANDOM_DROP, "clipscore": LOW_SIMILARITY, "dedup": DUPLICATE,
                      "clipscore_dedup": LOW_SIMILARITY}
COMPARISON_BITS = {"clipscore_dedup": [16, 64, 64]}  # key widths (curate.select); the others [64, 64]


def comparison_bits(name: str) -> list[int]:
    return COMPARISON_BITS.get(name, [64, 64])


def comparison_key(name: str, ids: np.ndarray, seed: int, image_text_cosine: np.ndarray | None = None,
                   duplicate_scores: np.ndarray | None = None, duplicate_threshold: float | None = None) -> Key:
    """The order a comparison policy keeps rows in (first kept first), ties by the seeded hash, then the id.

    ``random``: a seeded hash of the id; ``clipscore``: highest image–text cosine first (NaN last);
    ``dedup``: lowest SemDeDup score first (the most redundant rows go); ``clipscore_dedup``: rows
    that are not near-duplicates (SemDeDup score < ``duplicate_threshold``) first, then by cosine.
    """
    hashes = tie_hash(ids, seed)
    if name == "clipscore_dedup":
        if duplicate_threshold is None:
            raise ValueError("the clipscore_dedup policy needs curate.duplicate_threshold (the near-duplicate cut)")
        duplicate = np.asarray(duplicate_scores, dtype=np.float64) >= duplicate_threshold
        return Key([duplicate.astype(np.uint64), sortable(-np.asarray(image_text_cosine, dtype=np.float64)), hashes], [16, 64, 64])
    if name == "random":
        return Key([id_hash(ids, seed, RANDOM_SALT), hashes], [64, 64])
    if name == "clipscore":
        return Key([sortable(-np.asarray(image_text_cosine, dtype=np.float64)), hashes], [64, 64])
    if name == "dedup":
        return Key([sortable(np.asarray(duplicate_scores, dtype=np.float64)), hashes], [64, 64])
    raise ValueError(f"unknown comparison policy {name!r}; expected one of {sorted(COMPARISON_REASONS)}")


def comparison_rows(name: str, ids: np.ndarray, cluster: np.ndarray, keep: np.ndarray, key: Key | None = None) -> pd.DataFrame:
    reason = np.full(len(ids), COMPARISON_REASONS[name], dtype=object)
    if name == "clipscore_dedup" and key is not None:
        reason[np.asarray(key.words[0]) == 1] = DUPLICATE  # it left as a near-duplicate, not for its cosine
    return pd.DataFrame({"id": ids, "cluster": cluster, "keep": keep, "weight": keep.astype(np.float64),
                         "reason": np.where(keep, KEPT, reason)})[KEEP_COLUMNS]


def comparison_policy(name: str, assignments: pd.DataFrame, keep_fraction: float, seed: int = 0,
                      image_text_cosine: np.ndarray | None = None,
                      duplicate_scores: np.ndarray | None = None, duplicate_threshold: float | None = None) -> pd.DataFrame:
    """A comparison policy in memory (the reference of the stage's passes): the budget's first rows kept."""
    ids = assignments["id"].to_numpy()
    key = comparison_key(name, ids, seed, image_text_cosine, duplicate_scores, duplicate_threshold)
    keep = np.zeros(len(ids), dtype=bool)
    keep[lex_order(*key.words, ids=ids)[:budget_rows(len(ids), keep_fraction)]] = True
    return comparison_rows(name, ids, assignments["cluster"].to_numpy(), keep, key)


def random_policy(assignments: pd.DataFrame, keep_fraction: float, seed: int) -> pd.DataFrame:
    return comparison_policy("random", assignments, keep_fraction, seed)


def clipscore_policy(assignments: pd.DataFrame, image_text_cosine: np.ndarray, keep_fraction: float,
                     seed: int = 0) -> pd.DataFrame:
    return comparison_policy("clipscore", assignments, keep_fraction, seed, image_text_cosine=image_text_cosine)


def dedup_policy(assignments: pd.DataFrame, duplicate_scores: np.ndarray, keep_fraction: float,
                 seed: int = 0) -> pd.DataFrame:
    """Remove the most duplicated rows (highest SemDeDup score) until the budget is met."""
    return comparison_policy("dedup", assignments, keep_fraction, seed, duplicate_scores=duplicate_scores)


TILE_ELEMENTS = 1 << 21  # similarities per tile (8 MiB of float32)


def semdedup_scores(embeddings: np.ndarray, distances_to_centroid: np.ndarray, ids: np.ndarray | None = None,
                    tile_elements: int = TILE_ELEMENTS) -> np.ndarray:
    """SemDeDup duplicate score of each row of one cluster, tile by tile.

    Rows are ordered by distance to the centroid, farthest first (SemDeDup keeps the least
    prototypical member of a duplicate group; equal distances by id, so the order never depends on
    the order rows arrive in). A row's score is its highest cosine similarity to any row before it in
    that order: removing rows by descending score removes the most redundant first. Rows are compared
    ``t`` at a time against all rows before them, t = ⌊tile_elements / n⌋, so memory is
    O(tile_elements + n·d), never O(n²).
    """
    n = len(embeddings)
    if n <= 1:
        return np.full(n, -1.0) if n else np.zeros(0)
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    distance = np.asarray(distances_to_centroid, dtype=np.float64)
    if ids is None:
        order = np.argsort(-distance, kind="stable")
    else:
        order = lex_order(-distance, ids=ids)
    xs = x[order]
    ordered = np.empty(n)
    ordered[0] = -1.0
    tile = max(1, tile_elements // n)
    for start in range(1, n, tile):
        end = min(n, start + tile)
        sims = xs[start:end] @ xs[:end].T  # (end − start) × end
        # Only earlier rows count: mask the tile's diagonal block on and above the diagonal (a boolean
        # mask of t² bytes; index arrays from np.triu_indices would take 16·t²/2).
        np.putmask(sims[:, start:end], np.triu(np.ones((end - start, end - start), dtype=bool)), -np.inf)
        ordered[start:end] = sims.max(axis=1)
    scores = np.empty(n)
    scores[order] = ordered
    return scores
